"""The slower adapter tiers: adapters loaded in host memory (CPU tier) and their files in a local disk
cache (disk tier). A request for a cold adapter is served from the first tier that has it:
GPU slot (engine) > CPU > disk > the adapter's source.

CPU tier: least recently used first out past `max_cpu_adapters`, but never an adapter a request in
flight uses or waits for (the tier may run over its limit until that request ends). Disk tier: copies
of the adapters' two files under `disk_cache_dir`, least recently used first out past `max_bytes`, but
never one being fetched or read. Disk entries are keyed by the weights' checksum as well as name and
version, so a cache that outlives the process (or a registry) never serves other weights under a
reused name. A copy that fails to load is dropped; one that loaded before (damaged on disk since) is
fetched again from the source.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

from loraplex.registry.adapter_config import CONFIG_FILE, WEIGHTS_FILE, IncompatibleAdapter, InvalidAdapter
from loraplex.registry.adapter_source import read_adapter_files
from loraplex.shard.adapter_slots import TierCounters
from loraplex.shard.lora import LoraAdapter

log = logging.getLogger("loraplex.shard")

AdapterLoader = Callable[[str, str, int], LoraAdapter]  # (local source, name, version) -> adapter
Key = tuple[str, int]  # (name, version)


class DiskCache:
    """Thread-safe: loads for several adapters fetch at once from loader threads. The bookkeeping
    (hit check, publishing an entry, choosing what to evict, sizes) runs under one lock; the slow parts
    run outside it: the read from the source and the write of the copy (into a staging directory only
    that fetch uses), and the removal of evicted entries (renamed aside under the lock). An entry being
    fetched or read (see `pinned_copy`) is never evicted."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.counters = TierCounters()
        self._seen: set[Key] = set()
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()  # entry name -> fetches and reads of it in progress
        self._over_cap = False  # the last eviction pass left the cache over max_bytes (pinned entries)
        directory.mkdir(parents=True, exist_ok=True)
        for leftover in [*directory.glob(".*.partial"), *directory.glob(".*.evicted")]:  # a process died
            shutil.rmtree(leftover, ignore_errors=True)

    def local_copy(self, source: str, name: str, version: int, checksum: str) -> Path:
        """A directory holding the adapter's files, fetched from `source` on a miss."""
        return self.fetch(source, name, version, checksum)[0]

    def fetch(self, source: str, name: str, version: int, checksum: str) -> tuple[Path, bool]:
        """local_copy, and whether it was already here (a hit) rather than fetched from `source`."""
        with self.pinned_copy(source, name, version, checksum) as found:
            return found

    @contextlib.contextmanager
    def pinned_copy(self, source: str, name: str, version: int, checksum: str) -> Iterator[tuple[Path, bool]]:
        """fetch, the entry kept from eviction until the block ends, so the caller can read it."""
        entry = self.directory / _entry_name(name, version, checksum)
        with self._lock:
            self._pins[entry.name] += 1
        try:
            yield self._fetch_pinned(source, entry, (name, version), checksum)
        finally:
            doomed: list[Path | None] = []
            with self._lock:
                self._pins[entry.name] -= 1
                if not self._pins[entry.name]:
                    del self._pins[entry.name]
                    if self._over_cap:  # pinned entries kept it over its cap: evict what is free now
                        doomed = self._evict()
            _remove(doomed)

    def drop(self, name: str, version: int) -> None:
        with self._lock:
            doomed = [
                _set_aside(entry) for entry in self._entries() if _key_of(entry.name) == (name, version)
            ]
            self._seen.discard((name, version))
        _remove(doomed)

    def held(self) -> list[Key]:
        """Adapters asked for since start whose files are here (older entries are not advertised:
        their names may belong to another registry; they still serve as hits)."""
        with self._lock:
            self._seen &= {_key_of(entry.name) for entry in self._entries()}  # less what was evicted
            return sorted(self._seen)

    def _fetch_pinned(self, source: str, entry: Path, key: Key, checksum: str) -> tuple[Path, bool]:
        with self._lock:
            if (entry / WEIGHTS_FILE).is_file():
                self._seen.add(key)
                self.counters.hits += 1
                entry.touch()  # recency for eviction
                return entry, True
        started = time.perf_counter()
        config_bytes, weights = read_adapter_files(source)
        if hashlib.sha256(weights).hexdigest() != checksum:
            raise InvalidAdapter(
                f"the weights at {source} changed since the adapter was registered; update the adapter"
            )
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".partial", dir=self.directory))
        try:
            (staging / CONFIG_FILE).write_bytes(config_bytes)
            (staging / WEIGHTS_FILE).write_bytes(weights)
            with self._lock:
                if not (entry / WEIGHTS_FILE).is_file():  # else another fetch of it published first
                    shutil.rmtree(entry, ignore_errors=True)  # a copy missing its weights
                    staging.rename(entry)
                self._seen.add(key)
                self.counters.record_load(time.perf_counter() - started)
                doomed = self._evict()
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        _remove(doomed)
        return entry, False

    def _entries(self) -> list[Path]:
        return [entry for entry in self.directory.iterdir() if not entry.name.startswith(".")]

    def _evict(self) -> list[Path | None]:
        """Least recently used entries out until the cache fits, skipping pinned ones (the lock is held);
        they are set aside for the caller to remove. An entry that vanished meanwhile is skipped. If
        pinned entries keep the cache over its cap, the pass runs again as the last of them is let go."""
        entries = sorted(
            ((mtime, entry) for entry in self._entries() if (mtime := _mtime(entry)) is not None),
            key=lambda item: item[0],
        )
        sizes = {entry: _size(entry) for _, entry in entries}
        total, doomed = sum(sizes.values()), []
        for _, entry in entries:
            if total <= self.max_bytes:
                break
            if entry.name not in self._pins:
                total -= sizes[entry]
                doomed.append(_set_aside(entry))
                self.counters.evictions += 1
        self._over_cap = total > self.max_bytes
        return doomed


def _entry_name(name: str, version: int, checksum: str) -> str:
    return f"{name}-v{version}-{checksum}"


def _key_of(entry_name: str) -> Key | None:
    """(name, version) of an entry. Names may hold "-" but a version and a checksum (hex) never do, so
    the name is whatever comes before the last two parts; None for a foreign file."""
    parts = entry_name.rsplit("-", 2)
    if len(parts) != 3 or not parts[1].startswith("v") or not parts[1][1:].isdigit():
        return None
    return parts[0], int(parts[1][1:])


def _set_aside(entry: Path) -> Path | None:
    """Rename an entry out of the cache's view at once (cheap, under the lock); None if already gone."""
    aside = entry.with_name(f".{entry.name}.{secrets.token_hex(4)}.evicted")
    try:
        entry.rename(aside)
    except FileNotFoundError:
        return None
    return aside


def _remove(entries: list[Path | None]) -> None:
    for entry in entries:
        if entry is not None:
            shutil.rmtree(entry, ignore_errors=True)


def _mtime(entry: Path) -> float | None:
    try:
        return entry.stat().st_mtime
    except FileNotFoundError:
        return None


def _size(entry: Path) -> int:
    try:
        return sum(file.stat().st_size for file in entry.iterdir())
    except FileNotFoundError:
        return 0


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
        # counted before waiting for a load: once the load puts the adapter in this tier, other calls
        # may evict before this one resumes, and must not take the adapter it is about to be handed
        self._refs[key] = self._refs.get(key, 0) + 1
        try:
            adapter = self._adapters.get(key)
            tier = "cpu"
            if adapter is not None:
                self.counters.hits += 1
                self._adapters.move_to_end(key)
            else:
                adapter, tier = await self._load_once(source, key, checksum)
        except BaseException:  # the load failed, or this caller was cancelled while waiting
            self._unref(key)
            raise
        self._evict()
        return adapter, tier

    def release(self, adapter: LoraAdapter) -> None:
        self._unref((adapter.name, adapter.version))

    def _unref(self, key: Key) -> None:
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self._evict()

    def drop(self, name: str, version: int = 0) -> list[LoraAdapter]:
        """Remove one version of name, or all when version is 0; requests using them keep their copy."""
        dropped = [self._adapters.pop(key) for key in list(self._adapters) if _names(key, name, version)]
        for adapter in dropped:
            del self._checksums[(adapter.name, adapter.version)]
            self._on_evict(adapter)
            if self.disk is not None:
                self.disk.drop(adapter.name, adapter.version)
        # a load still running for a dropped version serves whoever waits for it, but is not kept
        self._dropped_while_loading.update(key for key in self._loading if _names(key, name, version))
        return dropped

    def held(self) -> list[Key]:
        return list(self._adapters)

    def loading(self) -> list[Key]:
        """Adapters being loaded: each ends up held unless dropped meanwhile (`drop` covers them too)."""
        return list(self._loading)

    def is_loading(self, name: str, version: int = 0) -> bool:
        """Whether a version of name (any, when version is 0) is being loaded."""
        return any(_names(key, name, version) for key in self._loading)

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
        try:
            adapter, tier = await asyncio.to_thread(self._load_from_tiers, source, key, checksum)
        finally:  # a drop applies to this load only: a later load of the key (a retry) is kept
            dropped = key in self._dropped_while_loading
            self._dropped_while_loading.discard(key)
        if dropped:
            self._on_evict(adapter)
            if self.disk is not None:
                self.disk.drop(*key)
            return adapter, tier
        self._adapters[key] = adapter
        self._checksums[key] = checksum
        self._evict()  # its waiters hold it (see acquire_with_tier); if they all left, it may go too
        return adapter, tier

    def _load_from_tiers(self, source: str, key: Key, checksum: str) -> tuple[LoraAdapter, str]:
        """The adapter and the tier it was read from. Each tier times its own step: the disk cache the
        fetch from the source, this tier the read of the local copy into host memory (disk -> ready)."""
        if self.disk is None or not checksum:  # without a checksum a cached copy can't be trusted
            return self._timed_load(source, key), "source"
        with self.disk.pinned_copy(source, *key, checksum) as (path, hit):  # not evicted while read
            try:
                return self._timed_load(str(path), key), "disk" if hit else "source"
            except (InvalidAdapter, IncompatibleAdapter):
                self.disk.drop(*key)  # a copy that does not load is neither kept nor advertised
                if not hit:
                    raise
        # the cached copy was damaged on disk since its fetch (it passed the checksum then): fetch again
        log.warning("the disk cache's copy of %s v%d does not load; fetching it from its source", *key)
        return self._load_from_tiers(source, key, checksum)

    def _timed_load(self, local: str, key: Key) -> LoraAdapter:
        started = time.perf_counter()
        adapter = self._load(local, *key)
        self.counters.record_load(time.perf_counter() - started)
        return adapter

    def _evict(self) -> None:
        for key in list(self._adapters):
            if len(self._adapters) <= self.max_cpu_adapters:
                return
            if key not in self._refs:
                del self._checksums[key]
                self._on_evict(self._adapters.pop(key))
                self.counters.evictions += 1


def _names(key: Key, name: str, version: int) -> bool:
    """Whether (name, version) names key, version 0 standing for every version."""
    return key[0] == name and version in (0, key[1])
