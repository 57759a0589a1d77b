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
        keeper.drop_adapter(await registry.delete_adapter("old"))  # what Adapters/Delete does
        registry.resume.set()
        assert await refresh
        assert set(keeper.current.adapters) == {"new"}, "the refresh kept this router's create and delete"

        await registry.delete_adapter("new")  # by another router: a refresh reading after it must show it
        assert await keeper.refresh()
        assert keeper.current.adapters == {}
        await registry.close()

    asyncio.run(scenario())


def test_this_routers_write_reply_landing_after_a_newer_refresh_does_not_go_back(redis_url, namespace):
    """Router A's update reply may be handled after a refresh that already read router B's later update."""

    async def scenario():
        mine, other = Registry(redis_url, namespace), Registry(redis_url, namespace)
        keeper = SnapshotKeeper(mine, refresh_interval_s=60)
        await mine.create_adapter(_record("x"))
        mine_v2 = await mine.update_adapter(_record("x"))  # its reply not handled yet
        await other.update_adapter(_record("x"))  # v3, by the other router
        assert await keeper.refresh()
        keeper.put_adapter(mine_v2)
        assert keeper.current.adapters["x"].version == 3

        mine_deleted = await mine.delete_adapter("x")  # v3 deleted here; its reply not handled yet
        await other.create_adapter(_record("x"))  # v4, by the other router
        assert await keeper.refresh()
        keeper.drop_adapter(mine_deleted)
        assert keeper.current.adapters["x"].version == 4, "the other router's newer create stays"
        await mine.close()
        await other.close()

    asyncio.run(scenario())


def test_a_refresh_does_not_reapply_this_routers_write_over_a_newer_one_it_read(redis_url, namespace):
    async def scenario():
        mine, other = PausedRegistry(redis_url, namespace), Registry(redis_url, namespace)
        keeper = SnapshotKeeper(mine, refresh_interval_s=60)
        await mine.create_adapter(_record("x"))
        mine.resume.set()
        assert await keeper.refresh()

        mine.resume.clear()
        mine.catalogue_read.clear()
        mine_v2 = await mine.update_adapter(_record("x"))  # its reply not handled yet
        await other.update_adapter(_record("x"))  # v3, by the other router
        refresh = asyncio.create_task(keeper.refresh())
        await mine.catalogue_read.wait()  # the refresh has read v3
        keeper.put_adapter(mine_v2)  # newer than the snapshot's v1, so applied at once
        mine.resume.set()
        assert await refresh
        assert keeper.current.adapters["x"].version == 3
        await mine.close()
        await other.close()

    asyncio.run(scenario())


def test_a_shard_leaves_when_its_heartbeat_stops_and_a_new_address_replaces_the_old(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        keeper = SnapshotKeeper(registry, refresh_interval_s=60, departed_grace_s=0.3)
        await registry.heartbeat(ShardRecord("gone", "127.0.0.1:1", "m"), ttl_s=0.3)
        await registry.heartbeat(ShardRecord("moved", "127.0.0.1:2", "m"), ttl_s=30)
        assert await keeper.refresh()
        await registry.heartbeat(ShardRecord("moved", "127.0.0.1:3", "m"), ttl_s=30)  # restarted elsewhere
        assert await keeper.refresh()
        assert {(s.shard_id, s.address) for s in keeper.current.shards} == {
            ("gone", "127.0.0.1:1"),
            ("moved", "127.0.0.1:3"),
        }
        await asyncio.sleep(0.35)  # past the TTL: "gone" is in its grace period
        assert await keeper.refresh()
        assert {s.shard_id for s in keeper.current.shards} == {"gone", "moved"}
        await asyncio.sleep(0.35)  # past the grace period too
        assert await keeper.refresh()
        assert [(s.shard_id, s.address) for s in keeper.current.shards] == [("moved", "127.0.0.1:3")]
        await registry.close()

    asyncio.run(scenario())


def test_a_redis_outage_keeps_the_last_snapshot_and_its_corrections(restartable_redis, namespace):
    """Coverage of behaviour that was already right: while Redis is down a refresh fails, and routing
    goes on with the adapters, the shards and this router's in-flight corrections it had."""

    async def scenario():
        registry = Registry(restartable_redis.url, namespace)
        keeper = SnapshotKeeper(registry, refresh_interval_s=60)
        await registry.create_adapter(_record("kept"))
        await registry.heartbeat(ShardRecord("s0", "127.0.0.1:1", "m", running_requests=2), ttl_s=30)
        assert await keeper.refresh()
        before = keeper.current
        keeper.inflight.started("s0")
        restartable_redis.stop()
        assert not await keeper.refresh()
        assert keeper.current is before
        assert set(keeper.current.adapters) == {"kept"} and [s.shard_id for s in keeper.current.shards] == [
            "s0"
        ]
        assert dict(keeper.inflight.corrections) == {"s0": 1}
        await registry.close()

    asyncio.run(scenario())
