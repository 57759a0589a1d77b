"""The router's view of the registry: adapters and live shards, refreshed in the background.

If Redis goes away the last snapshot stays in use, so routing carries on for known adapters. A shard
that drops out of the membership stays routable for `departed_grace_s` more: after a Redis outage
every heartbeat key has expired until the shards' next beats, and a router refreshing in that gap
would otherwise see no shard at all. A shard that is really gone costs one refused connection, after
which it is avoided (mark_suspect) and the request goes to the next candidate.

This router's own catalogue writes apply at once (put_adapter, drop_adapter). A refresh may have read
the registry before such a write and finish after it; each write is numbered, and a refresh re-applies
those numbered past the last write it could have seen, so it never undoes one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

import redis.exceptions

from loraplex.registry.records import AdapterRecord, ShardRecord
from loraplex.registry.store import Registry
from loraplex.router.placement import InflightTracker

log = logging.getLogger("loraplex.router")


@dataclass(frozen=True)
class RoutingSnapshot:
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    shards: tuple[ShardRecord, ...] = ()
    taken_at: float = 0.0


class SnapshotKeeper:
    def __init__(self, registry: Registry, refresh_interval_s: float, departed_grace_s: float = 5.0) -> None:
        self._registry = registry
        self._interval = refresh_interval_s
        self._departed_grace_s = departed_grace_s
        self._departed: dict[str, tuple[float, ShardRecord]] = {}  # shard id -> (first missed, last record)
        self.current = RoutingSnapshot()
        self._task: asyncio.Task | None = None
        self._suspects: dict[str, float] = {}  # shard id -> until when calls to it are avoided
        self.inflight = InflightTracker()  # this router's requests the snapshot's reports don't count yet
        self._refreshing = asyncio.Lock()  # one refresh at a time, so an older read never lands last
        self._num_writes = 0
        # this router's catalogue writes a refresh may not have seen: name -> (number, record; None: deleted)
        self._writes: dict[str, tuple[int, AdapterRecord | None]] = {}

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def refresh(self) -> bool:
        """Re-read the registry; keep the old snapshot and return False if it cannot be reached."""
        async with self._refreshing:
            seen_writes = self._num_writes  # the registry already holds these when it is read below
            try:
                adapters = await self._registry.list_adapters()
                shards = await self._registry.live_shards()
            except (redis.exceptions.RedisError, OSError) as error:
                if self.current.taken_at:
                    age = f"routing on the snapshot from {time.time() - self.current.taken_at:.1f}s ago"
                else:
                    age = "no snapshot yet, so no adapter can be routed"
                log.warning("registry unreachable, %s: %s", age, error)
                return False
            self.current = RoutingSnapshot(
                adapters=self._with_later_writes({record.name: record for record in adapters}, seen_writes),
                shards=tuple(shards) + self._recently_departed(shards),
                taken_at=time.time(),
            )
            self.inflight.snapshot_taken(self.current.shards)
            return True

    def _with_later_writes(
        self, adapters: dict[str, AdapterRecord], seen_writes: int
    ) -> dict[str, AdapterRecord]:
        """adapters with this router's writes numbered past seen_writes applied over them; the others are
        in adapters already and are forgotten."""
        for name, (number, record) in list(self._writes.items()):
            if number <= seen_writes:
                del self._writes[name]
            elif record is None:
                adapters.pop(name, None)
            else:
                adapters[name] = record
        return adapters

    def _recently_departed(self, live: list[ShardRecord]) -> tuple[ShardRecord, ...]:
        now = time.monotonic()
        live_ids = {shard.shard_id for shard in live}
        for shard in self.current.shards:
            if shard.shard_id not in live_ids and shard.shard_id not in self._departed:
                self._departed[shard.shard_id] = (now, shard)
        self._departed = {
            shard_id: (since, shard)
            for shard_id, (since, shard) in self._departed.items()
            if shard_id not in live_ids and now - since < self._departed_grace_s
        }
        return tuple(shard for _, shard in self._departed.values())

    def put_adapter(self, record: AdapterRecord) -> None:
        """Apply this router's own catalogue write at once, ahead of the next refresh."""
        self._note_write(record.name, record)
        self.current = replace(self.current, adapters={**self.current.adapters, record.name: record})

    def drop_adapter(self, name: str) -> None:
        self._note_write(name, None)
        adapters = dict(self.current.adapters)
        adapters.pop(name, None)
        self.current = replace(self.current, adapters=adapters)

    def _note_write(self, name: str, record: AdapterRecord | None) -> None:
        self._num_writes += 1
        self._writes[name] = (self._num_writes, record)

    def mark_suspect(self, shard_id: str, for_s: float) -> None:
        """A call to this shard failed to connect: avoid it until its heartbeat would have expired."""
        self._suspects[shard_id] = time.monotonic() + for_s

    def suspects(self) -> set[str]:
        now = time.monotonic()
        return {shard for shard, until in self._suspects.items() if until > now}

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.refresh()
            except Exception:  # a bug here must not freeze routing on an ever older snapshot
                log.exception("snapshot refresh failed; keeping the previous snapshot")
