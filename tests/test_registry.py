"""The registry against a real redis-server."""

import asyncio
import json

import pytest

from loraplex.registry.records import AdapterRecord, HeldAdapter, ShardRecord
from loraplex.registry.store import AdapterExists, AdapterNotFound, Registry


def _record(name: str = "support-bot", source: str = "/adapters/v1") -> AdapterRecord:
    return AdapterRecord(
        name=name,
        base_model="m",
        source=source,
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        checksum="abc",
    )


def run(coroutine):
    return asyncio.run(coroutine)


def test_create_get_list_and_duplicate_create(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        created = await registry.create_adapter(_record())
        assert created.version == 1 and created.created_at > 0
        assert await registry.get_adapter("support-bot") == created
        with pytest.raises(AdapterExists):
            await registry.create_adapter(_record(source="/elsewhere"))
        await registry.create_adapter(_record("another"))
        assert [r.name for r in await registry.list_adapters()] == ["another", "support-bot"]
        await registry.close()

    run(scenario())


def test_update_bumps_the_version_and_keeps_created_at(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        created = await registry.create_adapter(_record())
        updated = await registry.update_adapter(_record(source="/adapters/v2"))
        assert (updated.version, updated.source, updated.created_at) == (
            2,
            "/adapters/v2",
            created.created_at,
        )
        assert updated.updated_at >= created.updated_at
        with pytest.raises(AdapterNotFound):
            await registry.update_adapter(_record("missing"))
        await registry.close()

    run(scenario())


def test_delete_removes_record_and_index(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        await registry.create_adapter(_record())
        deleted = await registry.delete_adapter("support-bot")
        assert deleted.name == "support-bot"
        assert await registry.list_adapters() == []
        with pytest.raises(AdapterNotFound):
            await registry.delete_adapter("support-bot")
        await registry.close()

    run(scenario())


def test_a_name_created_again_after_its_delete_goes_on_past_its_old_versions(redis_url, namespace):
    """Shards may still hold the old versions: a new adapter under the name must never share one."""

    async def scenario():
        registry = Registry(redis_url, namespace)
        await registry.create_adapter(_record())
        await registry.update_adapter(_record(source="/adapters/v2"))
        assert (await registry.delete_adapter("support-bot")).version == 2
        again = await registry.create_adapter(_record(source="/adapters/other"))
        assert (again.version, again.source) == (3, "/adapters/other")
        assert await registry.get_adapter("support-bot") == again
        assert (await registry.create_adapter(_record("fresh"))).version == 1
        await registry.close()

    run(scenario())


def test_each_write_returns_the_record_it_wrote_however_writes_interleave(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        await registry.create_adapter(_record())
        sources = [f"/adapters/u{i}" for i in range(20)]
        updated = await asyncio.gather(*(registry.update_adapter(_record(source=s)) for s in sources))
        assert [record.source for record in updated] == sources
        assert sorted(record.version for record in updated) == list(range(2, 22))

        update, delete = await asyncio.gather(
            registry.update_adapter(_record(source="/adapters/last")), registry.delete_adapter("support-bot")
        )
        assert (update.source, update.version) == ("/adapters/last", 22), "applied, so not NOT_FOUND"
        assert (delete.source, delete.version) == ("/adapters/last", 22)
        await registry.close()

    run(scenario())


def test_every_change_is_announced_on_the_events_channel(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        received = []

        async def listen():
            async for event in registry.events():
                received.append(event)
                if len(received) == 3:
                    return

        listener = asyncio.create_task(listen())
        await asyncio.sleep(0.2)  # let the subscription reach the server
        await registry.create_adapter(_record())
        await registry.update_adapter(_record(source="/v2"))
        await registry.delete_adapter("support-bot")
        await asyncio.wait_for(listener, timeout=5)
        assert received == [
            {"op": "create", "name": "support-bot", "version": 1},
            {"op": "update", "name": "support-bot", "version": 2},
            {"op": "delete", "name": "support-bot"},
        ]
        await registry.close()

    run(scenario())


def test_shards_leave_the_membership_when_heartbeats_stop(redis_url, namespace):
    async def scenario():
        registry = Registry(redis_url, namespace)
        held = (HeldAdapter(name="a", version=1, tier="gpu"),)
        await registry.heartbeat(ShardRecord("s0", "127.0.0.1:1", "m", adapters=held), ttl_s=0.5)
        await registry.heartbeat(ShardRecord("s1", "127.0.0.1:2", "m"), ttl_s=30)
        shards = {s.shard_id: s for s in await registry.live_shards()}
        assert set(shards) == {"s0", "s1"} and shards["s0"].adapters == held
        await asyncio.sleep(0.8)
        assert [s.shard_id for s in await registry.live_shards()] == ["s1"]
        await registry.remove_shard("s1")
        assert await registry.live_shards() == []
        await registry.close()

    run(scenario())


def test_shard_record_round_trips_through_json():
    record = ShardRecord(
        "s0",
        "h:1",
        "m",
        8192,
        4,
        1,
        2,
        300,
        (HeldAdapter("a", 3, "cpu"),),
        max_lora_rank=64,
        num_layers=30,
        lora_features=(("self_attn.q_proj", 576, 576), ("mlp.down_proj", 1536, 576)),
    )
    assert ShardRecord.from_json(record.to_json()) == record
    assert (
        ShardRecord.from_json('{"shard_id": "old", "address": "h:2", "base_model": "m"}').lora_features == ()
    )
    assert json.loads(record.to_json())["adapters"] == [{"name": "a", "version": 3, "tier": "cpu"}]


def test_the_registry_answers_at_once_after_redis_restarts(restartable_redis):
    """Each pooled connection dies with the server; the first admin call after Redis is back must not
    fail for that (issue 5: admin calls recover when Redis returns)."""

    async def scenario():
        registry = Registry(restartable_redis.url, "restart")
        await asyncio.gather(*(registry.create_adapter(_record(f"a{i}")) for i in range(4)))  # a pool of 4
        restartable_redis.restart()
        assert await asyncio.gather(*(registry.list_adapters() for _ in range(4))) == [[]] * 4
        await registry.create_adapter(_record("after"))
        assert [record.name for record in await registry.list_adapters()] == ["after"]
        await registry.close()

    asyncio.run(scenario())
