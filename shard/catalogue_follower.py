"""Keeps a shard's adapter tiers in step with the registry's catalogue, without a restart.

On a delete the shard drops every version it holds or is loading (requests in flight finish on their
copy; its slot goes once they end). On an update it drops the older versions and, if it held or was
loading one, loads the new version in the background, so the adapter stays warm where traffic was
going to it. Events come from the registry's change channel; since a pub/sub message missed while
disconnected is lost, the follower also resyncs against the full catalogue after every
(re)subscription and periodically.
"""

from __future__ import annotations

import asyncio
import logging

import redis.exceptions

from loraplex.registry.records import AdapterRecord
from loraplex.registry.store import AdapterNotFound, Registry
from loraplex.shard.adapter_store import AdapterStore

log = logging.getLogger("loraplex.shard")
REGISTRY_ERRORS = (redis.exceptions.RedisError, OSError)


class CatalogueFollower:
    def __init__(self, registry: Registry, adapters: AdapterStore, resync_interval_s: float = 30.0) -> None:
        self._registry = registry
        self._adapters = adapters
        self._resync_interval_s = resync_interval_s
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        """Follow events and resync until cancelled; registry outages are waited out."""
        periodic = asyncio.create_task(self._resync_forever())
        try:
            while True:
                try:
                    async for event in self._registry.events(on_subscribed=self.resync):
                        await self.apply(event)
                except REGISTRY_ERRORS as error:
                    log.warning("catalogue events interrupted, resubscribing: %s", error)
                except Exception:  # a malformed event or record: the follower must outlive it
                    log.exception("could not apply a catalogue event, resubscribing")
                await asyncio.sleep(1.0)
        finally:
            periodic.cancel()
            for task in self._tasks:
                task.cancel()

    async def apply(self, event: dict) -> None:
        name, op = event.get("name", ""), event.get("op")
        if op == "delete":
            dropped = self._adapters.drop(name)
            if dropped:
                log.info("adapter %s deleted: dropped %d held version(s)", name, len(dropped))
        elif op == "update":
            try:
                record = await self._registry.get_adapter(name)
            except AdapterNotFound:
                return  # deleted since; its delete event follows
            self._refresh(record)

    async def resync(self) -> None:
        """Drop what the catalogue no longer has (or has newer), and warm what was updated."""
        # what was known before the read: an adapter a request brings in meanwhile may be newer than it
        known = {name for name, _ in self._known()}
        try:
            catalogue = {record.name: record for record in await self._registry.list_adapters()}
        except REGISTRY_ERRORS as error:
            log.warning("catalogue resync failed, will retry: %s", error)
            return
        except Exception:  # a malformed record: the resyncs go on, and succeed once it is fixed
            log.exception("catalogue resync could not read the catalogue, will retry")
            return
        for name in known:
            record = catalogue.get(name)
            if record is None:
                self._adapters.drop(name)
            else:
                self._refresh(record)

    def _known(self) -> list[tuple[str, int]]:
        """(name, version) held or being loaded: a load under way (say, for a request that arrived just
        before an update) would otherwise bring an outdated version in after the event."""
        return [*self._adapters.held(), *self._adapters.loading()]

    def _refresh(self, record: AdapterRecord) -> None:
        held = [version for name, version in self._known() if name == record.name]
        outdated = [version for version in held if version < record.version]
        for version in outdated:
            self._adapters.drop(record.name, version)
        if outdated and record.version not in held:
            task = asyncio.create_task(self._warm(record))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _warm(self, record: AdapterRecord) -> None:
        try:
            adapter = await self._adapters.acquire(
                record.source, record.name, record.version, record.checksum
            )
        except Exception as error:  # a bad update must not take the follower down; requests see the error
            log.warning("could not load %s v%d after its update: %s", record.name, record.version, error)
            return
        self._adapters.release(adapter)
        log.info("adapter %s updated: v%d loaded", record.name, record.version)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self._resync_interval_s)
            await self.resync()
