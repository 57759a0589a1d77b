"""The router's view of the registry: adapters and live shards, refreshed in the background.

If Redis goes away the last snapshot stays in use, so routing carries on for known adapters. A shard
that drops out of the membership stays routable for `departed_grace_s` more: after a Redis outage
every heartbeat key has expired until the shards' next beats, and a router refreshing in that gap
would otherwise see no shard at all. A shard that is really gone costs one refused connection, after
which it is avoided (mark_suspect) and the request goes to the next candidate.

This router's own catalogue writes apply at once (put_adapter, drop_adapter). A refresh may have read
the registry before such a write and finish after it; each write is numbered, and a refresh re-applies
those numbered past the last write it could have seen, so it never undoes one. Nor does a write undo a
later change read from the registry (another router's, whose effect may be read before this router
handles its own write's reply): versions only go up, so a write applies only over older ones. One case
stays open until the next refresh: a write whose adapter another router has since deleted, which the
refresh reads as an absence it cannot date. (Redis restarted empty issues versions from 1 again; a
write is then held back until the next refresh, which replaces the snapshot's adapters whole.)
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
        # this router's catalogue writes a refresh may not have seen: name -> (number, record, deleted)
        self._writes: dict[str, tuple[int, AdapterRecord, bool]] = {}

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
        """adapters with this router's writes numbered past seen_writes applied over them, unless what was
        read is as new; the others are in adapters already (or superseded) and are forgotten."""
        for name, (number, record, deleted) in list(self._writes.items()):
            read = adapters.get(name)
            if number <= seen_writes or (read is not None and _change(record, deleted) <= _change(read)):
                del self._writes[name]
            elif deleted:
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
        """Apply this router's own create or update at once, ahead of the next refresh."""
        self._apply_write(record, deleted=False)

    def drop_adapter(self, deleted: AdapterRecord) -> None:
        """Apply this router's own delete (the record it removed) at once."""
        self._apply_write(deleted, deleted=True)

    def _apply_write(self, record: AdapterRecord, deleted: bool) -> None:
        """Apply a write unless the snapshot or a write of this router already has a later change."""
        known = self.current.adapters.get(record.name)
        if known is not None and _change(record, deleted) <= _change(known):
            return
        pending = self._writes.get(record.name)
        if pending is not None and _change(record, deleted) <= _change(*pending[1:]):
            return
        self._num_writes += 1
        self._writes[record.name] = (self._num_writes, record, deleted)
        adapters = dict(self.current.adapters)
        if deleted:
            adapters.pop(record.name, None)
        else:
            adapters[record.name] = record
        self.current = replace(self.current, adapters=adapters)

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


def _change(record: AdapterRecord, deleted: bool = False) -> tuple[int, bool]:
    """Where a write falls among the changes to its adapter's name: the registry issues each name's
    versions in increasing order (across deletes too), and a version's delete follows it."""
    return (record.version, deleted)
