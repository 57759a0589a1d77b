"""Iteration-level scheduling: which sequences run in the next model step, and how many tokens each.

Every step, running sequences go first in admission order (a decode costs one token, an unfinished
prefill continues with a chunk), then waiting sequences are admitted first-come first-served while the
token budget, the running limit and the KV blocks allow. When blocks run out, the most recently
admitted sequence is preempted: its blocks are freed and it is recomputed later from its tokens.
A sequence with an adapter is admitted only once its adapter has a slot; while every slot is busy
it waits and later requests for the base model or for adapters already in a slot go ahead of it. So
that a steady stream for the adapters in the slots cannot starve it, once a sequence has found
every slot busy for `adapter_cycle_s`, one busy slot per adapter starved that long (the ones with the
fewest running sequences; at most a quarter of the slots, so that batches stay large) takes no new
sequences until it drains and goes to a starved adapter, as LoRAX's adapter cycle does; the other
slots, and the base model, keep taking requests.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from loraplex.shard.adapter_slots import NO_SLOT, AdapterSlots
from loraplex.shard.block_manager import BlockManager
from loraplex.shard.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # position of the chunk's first token (= tokens already in the cache)
    num_new_tokens: int
    samples: bool  # the chunk reaches seq's last token, so the step yields seq's next token

    @classmethod
    def of(cls, seq: Sequence, num_new_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        return cls(seq, start, num_new_tokens, start + num_new_tokens == seq.num_tokens)


@dataclass(frozen=True)
class Schedule:
    chunks: list[ScheduledChunk]
    preempted: list[Sequence]


class Scheduler:
    def __init__(
        self,
        blocks: BlockManager,
        max_batch_tokens: int,
        max_running_requests: int,
        slots: AdapterSlots | None = None,
        adapter_cycle_s: float = 2.0,
    ) -> None:
        self.blocks = blocks
        self.slots = slots
        self.max_batch_tokens = max_batch_tokens
        self.max_running_requests = max_running_requests
        self.adapter_cycle_s = adapter_cycle_s
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # request id -> (adapter uid, when it first found every slot busy)
        self._slot_wait_since: dict[str, tuple[int, float]] = {}

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def sequences(self) -> list[Sequence]:
        return [*self.running, *self.waiting]

    def finish(self, seq: Sequence) -> None:
        """Drop seq (done, cancelled or expired) and free its blocks at once. seq may be in neither
        queue (a step that failed half way): failing what is in flight must not fail on it."""
        for queue in (self.running, self.waiting):
            if seq in queue:  # by identity: sequences compare by id
                queue.remove(seq)
                break
        seq.status = SequenceStatus.FINISHED
        self.blocks.free(seq)
        self._release_slot(seq)
        self._slot_wait_since.pop(seq.request_id, None)

    def schedule(self) -> Schedule:
        budget = self.max_batch_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[Sequence] = []
        queue = deque(self.running)
        kept: list[Sequence] = []
        while queue and budget > 0:
            seq = queue.popleft()
            num_new = min(seq.num_uncomputed, budget)
            while not self.blocks.can_reserve(seq, num_new):
                victim = queue.pop() if queue else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break
            self.blocks.reserve(seq, num_new)
            chunks.append(ScheduledChunk.of(seq, num_new))
            kept.append(seq)
            budget -= num_new
        self.running = kept + list(queue)
        for seq in preempted:  # latest admitted first, so the earliest ends up at the front
            self.waiting.appendleft(seq)
        if not preempted:
            budget = self._admit(budget, chunks)
        return Schedule(chunks, preempted)

    def _admit(self, budget: int, chunks: list[ScheduledChunk]) -> int:
        """Admit waiting sequences into the step. If taking a slot raises (writing the adapter failed,
        a tensor-parallel rank was lost), every sequence is still in `waiting`, in order."""
        waiting_for_slot: list[Sequence] = []
        now = time.monotonic()
        draining = self._slots_to_drain(now)
        try:
            while self.waiting and budget > 0 and len(self.running) < self.max_running_requests:
                seq = self.waiting[0]
                # A sequence that cannot run for want of a slot steps aside before the blocks are
                # weighed, so that it never holds up the base model or the adapters in the slots.
                if seq.adapter is not None and seq.adapter.uid in draining:
                    waiting_for_slot.append(self.waiting.popleft())  # held back so its slot drains
                    continue
                if not self._can_acquire_slot(seq):  # every slot busy: the adapter cycle's clock starts
                    self._slot_wait_since.setdefault(seq.request_id, (seq.adapter.uid, now))
                    waiting_for_slot.append(self.waiting.popleft())
                    continue
                prefix = self.blocks.cached_prefix(seq)
                num_new = min(seq.num_uncomputed - len(prefix) * self.blocks.block_size, budget)
                if not self.blocks.can_reserve(seq, num_new, prefix):
                    break  # first come, first served: nobody overtakes the head of the queue for blocks
                self._acquire_slot(seq)
                self.blocks.reserve(seq, num_new, prefix)
                self.running.append(self.waiting.popleft())
                self._slot_wait_since.pop(seq.request_id, None)
                seq.status = SequenceStatus.RUNNING
                # the first admission ends its queue wait
                seq.scheduled_ns = seq.scheduled_ns or time.time_ns()
                chunks.append(ScheduledChunk.of(seq, num_new))
                budget -= num_new
        finally:
            self.waiting.extendleft(reversed(waiting_for_slot))
        return budget

    def _slots_to_drain(self, now: float) -> set[int]:
        """uids of the adapters whose busy slots take no new sequences this step: one per adapter that
        has found every slot busy for adapter_cycle_s, up to a quarter of the slots."""
        if self.slots is None:
            return set()
        # an adapter that has a slot again (its first waiting request got one) is starved no longer:
        # its other requests' clocks must not make its own slot drain
        starved = {
            uid
            for uid, since in self._slot_wait_since.values()
            if now - since >= self.adapter_cycle_s and not self.slots.holds(uid)
        }
        if not starved:
            return set()
        return self.slots.quickest_to_drain(min(len(starved), max(1, self.slots.num_slots // 4)))

    def _can_acquire_slot(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            return True
        if self.slots is None:
            raise RuntimeError("a sequence has an adapter but the scheduler has no adapter slots")
        return self.slots.can_acquire(seq.adapter)

    def _acquire_slot(self, seq: Sequence) -> None:
        """Give seq its adapter's slot (after _can_acquire_slot said it may have one)."""
        if seq.adapter is None or self.slots is None:
            return
        held = self.slots.holds(seq.adapter.uid)
        seq.lora_slot = self.slots.acquire(seq.adapter)
        if seq.lora_slot == NO_SLOT:
            raise RuntimeError(f"adapter slot for {seq.request_id} vanished between check and acquire")
        if not seq.scheduled_ns:  # what its first admission found, for tracing
            seq.slot_hit = held

    def _release_slot(self, seq: Sequence) -> None:
        if seq.lora_slot != NO_SLOT and self.slots is not None:
            self.slots.release(seq.lora_slot)
        seq.lora_slot = NO_SLOT

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self._release_slot(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1

    def advance(self, chunks: list[ScheduledChunk]) -> None:
        """Record that the step computed these chunks' tokens into the cache."""
        for chunk in chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
            self.blocks.register_computed(chunk.seq)
