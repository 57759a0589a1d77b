"""The fastest adapter tier: the slots the batched LoRA path reads from (GPU memory on a GPU shard).

At most `num_slots` adapters are active at once. A sequence holds its adapter's slot from admission to
finish; an idle slot keeps its adapter (a later request is a hit) until the least recently used idle
slot is needed for another adapter. A slot in use is never taken.
"""

from __future__ import annotations

import bisect
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.shard.lora import LoraAdapter
from loraplex.shard.lora_ops import NO_SLOT

__all__ = ["NO_SLOT", "AdapterSlots", "TierCounters"]


# Upper bounds of the load-latency histogram buckets (seconds): a slot swap is sub-millisecond, a
# fetch from a remote source may take seconds.
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


@dataclass
class TierCounters:
    """One tier's hits, misses, evictions and load latencies (a miss is a load into the tier)."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    # the most recent loads' durations, one per miss (bounded: a shard runs for months)
    load_seconds: deque[float] = field(default_factory=lambda: deque(maxlen=4096))
    # every load since start, as Prometheus histogram buckets (cumulative counts are built at scrape)
    load_bucket_counts: list[int] = field(default_factory=lambda: [0] * len(LOAD_BUCKETS))
    load_seconds_sum: float = 0.0

    def record_load(self, seconds: float) -> None:
        self.misses += 1
        self.load_seconds.append(seconds)
        self.load_seconds_sum += seconds
        self.load_bucket_counts[bisect.bisect_left(LOAD_BUCKETS, seconds)] += 1


# Dropped uids remembered (a shard runs for months): a request holding a copy dropped this many drops
# ago is implausible, and if one did, its stale slot would only idle until the LRU reuses it.
MAX_REMEMBERED_DROPS = 1 << 16


class AdapterSlots:
    def __init__(self, num_slots: int, write_slot: Callable[[int, LoraAdapter], None] | None = None) -> None:
        """write_slot(slot, adapter) copies the weights where the kernels read them (stacked GPU buffers);
        the plain-torch path reads the adapter's own tensors and needs no copy."""
        if num_slots < 1:
            raise ValueError("max_gpu_adapters must be at least 1")
        self.num_slots = num_slots
        self._write_slot = write_slot
        self._adapters: list[LoraAdapter | None] = [None] * num_slots
        self._refs = [0] * num_slots
        self._slot_of: dict[int, int] = {}  # adapter uid -> slot
        self._idle: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_slots))  # LRU first
        # uids dropped from the CPU tier (deleted, updated or evicted there), oldest first: a uid names
        # one loaded copy and is never handed out again, so its slot is freed whenever it goes idle,
        # even after a request that still held the old copy took a slot for it again
        self._dropped: OrderedDict[int, None] = OrderedDict()
        self.counters = TierCounters()

    def can_acquire(self, adapter: LoraAdapter) -> bool:
        """Whether acquire(adapter) would give a slot now: the adapter has one, or one is idle."""
        return adapter.uid in self._slot_of or bool(self._idle)

    def acquire(self, adapter: LoraAdapter) -> int:
        """The adapter's slot, loading it into the least recently used idle slot if needed; NO_SLOT when
        every slot is in use (the request waits)."""
        slot = self._slot_of.get(adapter.uid)
        if slot is not None:
            self.counters.hits += 1
        else:
            if not self._idle:
                return NO_SLOT
            slot = next(iter(self._idle))
            started = time.perf_counter()
            self._evict(slot)
            if self._write_slot is not None:
                self._write_slot(slot, adapter)
            self._adapters[slot] = adapter
            self._slot_of[adapter.uid] = slot
            self.counters.record_load(time.perf_counter() - started)
        if self._refs[slot] == 0:
            del self._idle[slot]
        self._refs[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        self._refs[slot] -= 1
        if self._refs[slot] == 0:
            self._idle[slot] = None  # most recently used goes last
            adapter = self._adapters[slot]
            if adapter is not None and adapter.uid in self._dropped:
                self._evict(slot)

    def drop(self, adapter_uid: int) -> None:
        """Free the adapter's slot now if idle, else as soon as its last sequence finishes; and free it
        again whenever a sequence still waiting with this copy takes a slot for it and finishes."""
        self._dropped[adapter_uid] = None
        if len(self._dropped) > MAX_REMEMBERED_DROPS:
            self._dropped.popitem(last=False)
        slot = self._slot_of.get(adapter_uid)
        if slot is not None and self._refs[slot] == 0:
            self._evict(slot)

    def adapter(self, slot: int) -> LoraAdapter:
        adapter = self._adapters[slot]
        assert adapter is not None, f"slot {slot} is empty"
        return adapter

    def held(self) -> list[LoraAdapter]:
        return [adapter for adapter in self._adapters if adapter is not None]

    def holds(self, adapter_uid: int) -> bool:
        """Whether the adapter has a slot (acquiring it would be a hit)."""
        return adapter_uid in self._slot_of

    def in_use(self, adapter_uid: int) -> bool:
        slot = self._slot_of.get(adapter_uid)
        return slot is not None and self._refs[slot] > 0

    def quickest_to_drain(self, count: int) -> set[int]:
        """uids of the count in-use adapters with the fewest running sequences: the slots to let drain
        when other adapters are starved of one."""
        busy = sorted((refs, slot) for slot, refs in enumerate(self._refs) if refs > 0)
        return {self._adapters[slot].uid for _, slot in busy[:count] if self._adapters[slot] is not None}

    def _evict(self, slot: int) -> None:
        adapter = self._adapters[slot]
        if adapter is None:
            return
        del self._slot_of[adapter.uid]
        self._adapters[slot] = None
        self.counters.evictions += 1
