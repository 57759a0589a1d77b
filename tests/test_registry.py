"""The registry against a real redis-server."""

import asyncio
import json
import time

import pytest
import redis.exceptions

from loraplex.registry import store
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


def test_a_subscriber_resyncs_after_redis_restarts_empty(restartable_redis):
    """Redis lost everything while the subscription was down, with no delete announced: a subscriber
    learns it only by resyncing after it subscribes again (what the shard's catalogue follower does)."""

    async def scenario():
        registry = Registry(restartable_redis.url, "restart")
        await registry.create_adapter(_record("a"))
        known: set[str] = set()
        num_resyncs = 0

        async def resync():
            nonlocal num_resyncs
            known.clear()
            known.update(record.name for record in await registry.list_adapters())
            num_resyncs += 1

        async def follow():
            while True:
                try:
                    async for event in registry.events(on_subscribed=resync):
                        if event["op"] == "delete":
                            known.discard(event["name"])
                except (redis.exceptions.RedisError, OSError):
                    await asyncio.sleep(0.05)

        follower = asyncio.create_task(follow())
        while num_resyncs == 0:
            await asyncio.sleep(0.01)
        assert known == {"a"}
        restartable_redis.restart()  # blocks this loop: the subscriber sees the drop only once it is back
        for _ in range(300):
            if num_resyncs > 1:
                break
            await asyncio.sleep(0.01)
        assert num_resyncs == 2 and known == set(), "a resync after subscribing again found 'a' gone"
        follower.cancel()
        await registry.close()

    asyncio.run(scenario())


async def _listening(registry: Registry) -> tuple[list[dict], asyncio.Task]:
    """Subscribe to registry's events; returns the list they land in and the task to cancel."""
    heard: list[dict] = []
    subscribed = asyncio.Event()

    async def on_subscribed():
        subscribed.set()

    async def listen():
        async for event in registry.events(on_subscribed=on_subscribed):
            heard.append(event)

    listener = asyncio.create_task(listen())
    await subscribed.wait()
    return heard, listener


def test_events_of_one_redis_database_stay_there(redis_url, namespace):
    """Pub/sub channels are server-wide, not per database: two meshes told apart by the database in
    their URL (same namespace) must not hear each other's changes."""

    async def scenario():
        here = Registry(redis_url, namespace)
        there = Registry(redis_url.rsplit("/", 1)[0] + "/1", namespace)
        heard, listener = await _listening(there)
        await here.create_adapter(_record("mine"))
        await there.create_adapter(_record("theirs"))
        for _ in range(200):
            if heard:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert heard == [{"op": "create", "name": "theirs", "version": 1}]
        listener.cancel()
        await here.close()
        await there.close()

    run(scenario())


def test_a_shard_whose_clock_runs_behind_stays_live(redis_url, namespace, monkeypatch):
    """Membership must not depend on shards' and routers' clocks agreeing: the TTL runs on Redis."""

    async def scenario():
        registry = Registry(redis_url, namespace)
        real_time = time.time
        monkeypatch.setattr(store.time, "time", lambda: real_time() - 60)  # the shard's clock
        await registry.heartbeat(ShardRecord("behind", "127.0.0.1:1", "m"), ttl_s=5)
        monkeypatch.setattr(store.time, "time", lambda: real_time() + 60)  # another shard's clock
        await registry.heartbeat(ShardRecord("ahead", "127.0.0.1:2", "m"), ttl_s=5)
        monkeypatch.setattr(store.time, "time", real_time)  # the router's clock
        assert {shard.shard_id for shard in await registry.live_shards()} == {"behind", "ahead"}
        await registry.close()

    run(scenario())


def test_a_shard_record_with_fields_from_a_newer_release_still_reads(redis_url, namespace):
    """During a rolling upgrade a newer shard may report fields this router does not know yet; they
    are ignored rather than failing the whole membership read."""

    async def scenario():
        registry = Registry(redis_url, namespace)

        class NewerShardRecord(ShardRecord):
            def to_json(self) -> str:
                fields = json.loads(super().to_json())
                fields["adapters"] = [{**held, "pinned": True} for held in fields["adapters"]]
                return json.dumps({**fields, "gpu_memory_free": 123})

        held = (HeldAdapter(name="a", version=1, tier="gpu"),)
        await registry.heartbeat(NewerShardRecord("new", "127.0.0.1:1", "m", adapters=held), ttl_s=30)
        await registry.heartbeat(ShardRecord("old", "127.0.0.1:2", "m"), ttl_s=30)
        shards = {shard.shard_id: shard for shard in await registry.live_shards()}
        assert set(shards) == {"new", "old"} and shards["new"].adapters == held
        await registry.close()

    run(scenario())


class ReplyDroppingProxy:
    """A TCP proxy in front of the real Redis that, once armed, closes the client's connection in
    place of passing Redis's next reply on: the command ran, and its caller cannot know."""

    def __init__(self, redis_port: int) -> None:
        self._redis_port = redis_port
        self.armed = False

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _serve(self, client_reader, client_writer) -> None:
        redis_reader, redis_writer = await asyncio.open_connection("127.0.0.1", self._redis_port)

        async def pump(reader, writer, replies: bool) -> None:
            try:
                while data := await reader.read(65536):
                    if replies and self.armed:
                        self.armed = False
                        client_writer.transport.abort()
                        return
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pass
            finally:
                writer.close()

        await asyncio.gather(
            pump(client_reader, redis_writer, False), pump(redis_reader, client_writer, True)
        )


def test_a_write_whose_reply_was_lost_is_not_done_twice(redis_url, namespace):
    """The registry sends a command again on a fresh connection when its connection drops (as after a
    Redis restart), though it may have run: the create answered ALREADY_EXISTS and the update made two
    versions."""

    async def scenario():
        proxy = ReplyDroppingProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        registry = Registry(await proxy.start(), namespace)
        await registry.update_adapter(await registry.create_adapter(_record("warm")))  # scripts loaded

        proxy.armed = True
        created = await registry.create_adapter(_record())
        proxy.armed = True
        updated = await registry.update_adapter(_record(source="/adapters/v2"))
        assert (created.version, updated.version, updated.source) == (1, 2, "/adapters/v2")
        assert await registry.get_adapter("support-bot") == updated
        assert not proxy.armed, "both replies were dropped"
        with pytest.raises(AdapterExists):  # another create of the name still fails
            await registry.create_adapter(_record())
        await registry.close()

    run(scenario())


def test_two_namespaces_on_one_redis_share_nothing(redis_url, namespace):
    async def scenario():
        first, second = Registry(redis_url, namespace), Registry(redis_url, f"{namespace}:adapter")
        heard, listener = await _listening(second)
        await first.create_adapter(_record("x"))
        await first.update_adapter(_record("x"))
        await first.heartbeat(ShardRecord("s0", "127.0.0.1:1", "m"), ttl_s=30)
        assert (await second.create_adapter(_record("x"))).version == 1
        assert [record.version for record in await first.list_adapters()] == [2]
        assert await second.live_shards() == []
        await asyncio.sleep(0.1)
        assert heard == [{"op": "create", "name": "x", "version": 1}]
        listener.cancel()
        await first.close()
        await second.close()

    run(scenario())
