"""The router's registry snapshot against a real redis-server: its own catalogue writes are never undone
by a refresh that read the registry before them."""

import asyncio

from loraplex.registry.records import AdapterRecord, ShardRecord
from loraplex.registry.store import Registry
from loraplex.router.snapshot import SnapshotKeeper


def _record(name: str) -> AdapterRecord:
    return AdapterRecord(
        name=name,
        base_model="m",
        source=f"/adapters/{name}",
        rank=8,
        alpha=16.0,
        target_modules=(),
        checksum="c",
    )


class PausedRegistry(Registry):
    """A registry whose refresh read pauses between the catalogue and the membership, until resumed."""

    def __init__(self, url: str, namespace: str) -> None:
        super().__init__(url, namespace)
        self.catalogue_read = asyncio.Event()
        self.resume = asyncio.Event()

    async def live_shards(self) -> list[ShardRecord]:
        self.catalogue_read.set()
        await self.resume.wait()
        return await super().live_shards()


def test_a_refresh_that_read_before_this_routers_own_writes_does_not_undo_them(redis_url, namespace):
    async def scenario():
        registry = PausedRegistry(redis_url, namespace)
        await registry.create_adapter(_record("old"))
        keeper = SnapshotKeeper(registry, refresh_interval_s=60)
        registry.resume.set()
        await keeper.refresh()
        assert set(keeper.current.adapters) == {"old"}

        registry.resume.clear()
        registry.catalogue_read.clear()
        refresh = asyncio.create_task(keeper.refresh())
        await registry.catalogue_read.wait()  # it has read the catalogue: only "old"
        keeper.put_adapter(await registry.create_adapter(_record("new")))  # what Adapters/Create does
        await registry.delete_adapter("old")
        keeper.drop_adapter("old")  # what Adapters/Delete does
        registry.resume.set()
        assert await refresh
        assert set(keeper.current.adapters) == {"new"}, "the refresh kept this router's create and delete"

        await registry.delete_adapter("new")  # by another router: a refresh reading after it must show it
        assert await keeper.refresh()
        assert keeper.current.adapters == {}
        await registry.close()

    asyncio.run(scenario())
