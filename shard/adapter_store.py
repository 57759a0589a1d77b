"""The slower adapter tiers: adapters loaded in host memory (CPU tier) and their files in a local disk
cache (disk tier). A request for a cold adapter is served from the first tier that has it:
GPU slot (engine) > CPU > disk > the adapter's source.

CPU tier: least recently used first out past `max_cpu_adapters`, but never an adapter a request in
flight uses (the tier may run over its limit until that request ends). Disk tier: copies of the
adapters' two files under `disk_cache_dir`, least recently used first out past `max_bytes`. Disk
entries are keyed by the weights' checksum as well as name and version, so a cache that outlives the
process (or a registry) never serves other weights under a reused name.
"""

from __future__ import annotations

import asyncio
import hashlib
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from loraplex.registry.adapter_source import CONFIG_FILE, WEIGHTS_FILE, InvalidAdapter, read_adapter_files
from loraplex.shard.adapter_slots import TierCounters
from loraplex.shard.lora import LoraAdapter

AdapterLoader = Callable[[str, str, int], LoraAdapter]  # (local source, name, version) -> adapter
Key = tuple[str, int]  # (name, version)


class DiskCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.counters = TierCounters()
        self._seen: set[Key] = set()
        directory.mkdir(parents=True, exist_ok=True)

    def local_copy(self, source: str, name: str, version: int, checksum: str) -> Path:
        """A directory holding the adapter's files, fetched from `source` on a miss."""
        return self.fetch(source, name, version, checksum)[0]

    def fetch(self, source: str, name: str, version: int, checksum: str) -> tuple[Path, bool]:
        """local_copy, and whether it was already here (a hit) rather than fetched from `source`."""
        entry = self.directory / f"{name}-v{version}-{checksum}"
        if (entry / WEIGHTS_FILE).is_file():
            self._seen.add((name, version))
            self.counters.hits += 1
            entry.touch()  # recency for eviction
            return entry, True
        started = time.perf_counter()
        config_bytes, weights = read_adapter_files(source)
        if hashlib.sha256(weights).hexdigest() != checksum:
            raise InvalidAdapter(
                f"the weights at {source} changed since the adapter was registered; update the adapter"
            )
        staging = self.directory / f".{entry.name}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        (staging / CONFIG_FILE).write_bytes(config_bytes)
        (staging / WEIGHTS_FILE).write_bytes(weights)
        shutil.rmtree(entry, ignore_errors=True)
        staging.rename(entry)
        self._seen.add((name, version))
        self.counters.record_load(time.perf_counter() - started)
        self._evict(keep=entry)
        return entry, False

    def drop(self, name: str, version: int) -> None:
        for entry in self.directory.glob(f"{name}-v{version}-*"):
            shutil.rmtree(entry, ignore_errors=True)
        self._seen.discard((name, version))

    def held(self) -> list[Key]:
        """Adapters asked for since start whose files are here (older entries are not advertised:
        their names may belong to another registry; they still serve as hits)."""
        return sorted(self._seen)

    def _evict(self, keep: Path) -> None:
        entries = sorted(
            (e for e in self.directory.iterdir() if not e.name.startswith(".")),
            key=lambda e: e.stat().st_mtime,
        )
        total = sum(_size(entry) for entry in entries)
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry != keep:
                total -= _size(entry)
                shutil.rmtree(entry, ignore_errors=True)
                self.counters.evictions += 1


def _size(entry: Path) -> int:
    return sum(file.stat().st_size for file in entry.iterdir())


class AdapterStore:
    """The CPU tier over the disk tier; `acquire` loads an adapter at most once however many ask."""

    def __init__(
        self,
        load: AdapterLoader,
        max_cpu_adapters: int,
        disk: DiskCache | None = None,
        on_evict: Callable[[LoraAdapter], None] = lambda adapter: None,
    ) -> None:
        """on_evict(adapter) runs for every adapter that leaves this tier, so faster tiers (the engine's
        slots) let it go too and always hold a subset of this one."""
        self._load = load
        self._on_evict = on_evict
        self.max_cpu_adapters = max_cpu_adapters
        self.disk = disk
        self._adapters: OrderedDict[Key, LoraAdapter] = OrderedDict()  # least recently used first
        self._checksums: dict[Key, str] = {}  # of the weights each held adapter was loaded from
        self._refs: dict[Key, int] = {}
        self._loading: dict[Key, asyncio.Task[tuple[LoraAdapter, str]]] = {}
        self._dropped_while_loading: set[Key] = set()
        self.counters = TierCounters()

    async def acquire(self, source: str, name: str, version: int, checksum: str = "") -> LoraAdapter:
        """The adapter, loaded if needed; the caller must `release` it when its request ends."""
        return (await self.acquire_with_tier(source, name, version, checksum))[0]

    async def acquire_with_tier(
        self, source: str, name: str, version: int, checksum: str = ""
    ) -> tuple[LoraAdapter, str]:
        """acquire, and the tier the adapter came from: "cpu" (already in memory), "disk" (the disk
        cache) or "source" (a request that waited on another's load gets that load's tier)."""
        key = (name, version)
        if checksum and key in self._adapters and self._checksums[key] != checksum:
            # other weights under this (name, version): a registry that was reset, or one from before
            # versions outlived a delete, issued it again; never serve the old ones for the new record
            self.drop(name, version)
        adapter = self._adapters.get(key)
        tier = "cpu"
        if adapter is not None:
            self.counters.hits += 1
            self._adapters.move_to_end(key)
        else:
            adapter, tier = await self._load_once(source, key, checksum)
        self._refs[key] = self._refs.get(key, 0) + 1
        self._evict()  # after counting this use, so the adapter just loaded is never the one to go
        return adapter, tier

    def release(self, adapter: LoraAdapter) -> None:
        key = (adapter.name, adapter.version)
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self._evict()

    def drop(self, name: str, version: int = 0) -> list[LoraAdapter]:
        """Remove one version of name, or all when version is 0; requests using them keep their copy."""
        dropped = [
            self._adapters.pop(key)
            for key in list(self._adapters)
            if key[0] == name and version in (0, key[1])
        ]
        for adapter in dropped:
            del self._checksums[(adapter.name, adapter.version)]
            self._on_evict(adapter)
            if self.disk is not None:
                self.disk.drop(adapter.name, adapter.version)
        # a load still running for a dropped version serves whoever waits for it, but is not kept
        self._dropped_while_loading.update(
            key for key in self._loading if key[0] == name and version in (0, key[1])
        )
        return dropped

    def held(self) -> list[Key]:
        return list(self._adapters)

    async def _load_once(self, source: str, key: Key, checksum: str) -> tuple[LoraAdapter, str]:
        """One load per key however many ask; it runs as its own task, so a caller that goes away
        (a cancelled request) never cancels the load the others are waiting for."""
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load_and_keep(source, key, checksum))
            self._loading[key] = task
            task.add_done_callback(lambda done: self._loading.pop(key, None))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, not "lost"
        return await asyncio.shield(task)

    async def _load_and_keep(self, source: str, key: Key, checksum: str) -> tuple[LoraAdapter, str]:
        adapter, tier = await asyncio.to_thread(self._load_from_tiers, source, key, checksum)
        if key in self._dropped_while_loading:
            self._dropped_while_loading.discard(key)
            self._on_evict(adapter)
            if self.disk is not None:
                self.disk.drop(*key)
            return adapter, tier
        self._adapters[key] = adapter
        self._checksums[key] = checksum
        return adapter, tier

    def _load_from_tiers(self, source: str, key: Key, checksum: str) -> tuple[LoraAdapter, str]:
        """The adapter and the tier it was read from. Each tier times its own step: the disk cache the
        fetch from the source, this tier the read of the local copy into host memory (disk -> ready)."""
        local, tier = source, "source"
        if self.disk is not None and checksum:  # without a checksum a cached copy can't be trusted
            path, hit = self.disk.fetch(source, *key, checksum)
            local, tier = str(path), "disk" if hit else "source"
        started = time.perf_counter()
        adapter = self._load(local, *key)
        self.counters.record_load(time.perf_counter() - started)
        return adapter, tier

    def _evict(self) -> None:
        for key in list(self._adapters):
            if len(self._adapters) <= self.max_cpu_adapters:
                return
            if key not in self._refs:
                del self._checksums[key]
                self._on_evict(self._adapters.pop(key))
                self.counters.evictions += 1
