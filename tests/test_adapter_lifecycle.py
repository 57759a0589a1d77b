"""An adapter's life on a shard: loads that fail and are retried, the disk tier's report and cap, and
the shard following the registry's catalogue (a real redis-server) through updates while loading and
malformed events."""

import asyncio
import threading
from pathlib import Path

import pytest
import redis.asyncio

from loraplex.registry.adapter_config import WEIGHTS_FILE, InvalidAdapter
from loraplex.registry.adapter_source import catalogue_record, read_metadata
from loraplex.registry.store import Registry
from loraplex.shard.adapter_store import AdapterStore, DiskCache
from loraplex.shard.catalogue_follower import CatalogueFollower
from loraplex.shard.engine import Engine, EngineConfig
from loraplex.shard.lora import LoraAdapter

from peft_fixtures import write_peft_adapter


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    return Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, max_gpu_adapters=2))


@pytest.fixture(scope="module")
def sources(tiny_model_dir, tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("lifecycle")
    return [
        str(write_peft_adapter(root / f"a{i}", tiny_model_dir, rank=4, seed=i, scale=0.5)) for i in range(4)
    ]


def _checksum(source: str) -> str:
    return read_metadata(source).checksum


def _num_bytes(directory: Path) -> int:
    return sum(file.stat().st_size for file in directory.iterdir())


async def _wait_for(condition, timeout_s: float = 5.0) -> bool:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return True
        await asyncio.sleep(0.01)
    return condition()


# --- the disk tier -----------------------------------------------------------------------------------


def test_the_disk_tier_reports_only_the_adapters_whose_files_it_still_holds(sources, tmp_path):
    """A shard advertises disk.held() as its disk tier: an entry evicted for space must leave it."""
    disk = DiskCache(tmp_path / "disk", max_bytes=int(2.5 * max(_num_bytes(Path(s)) for s in sources)))
    for i, source in enumerate(sources):
        disk.fetch(source, f"a{i}", 1, _checksum(source))
    on_disk = sorted(entry.name.split("-v")[0] for entry in disk.directory.iterdir())
    assert len(on_disk) == 2 and disk.counters.evictions == 2
    assert [name for name, _ in disk.held()] == on_disk == ["a2", "a3"]


def test_the_disk_cache_gets_back_under_its_cap_once_the_entries_in_use_are_let_go(sources, tmp_path):
    """Entries being read can't be evicted, so the cache may run over its cap; it must not stay over
    once they are let go (no later fetch may come to evict), as the CPU tier does."""
    disk = DiskCache(tmp_path / "disk", max_bytes=int(1.5 * max(_num_bytes(Path(s)) for s in sources)))
    with disk.pinned_copy(sources[0], "a0", 1, _checksum(sources[0])):
        with disk.pinned_copy(sources[1], "a1", 1, _checksum(sources[1])):
            assert len(disk.held()) == 2, "both being read: over the cap for now"
        assert disk.held() == [("a0", 1)], "a1, let go while a0 is still read, goes"
    assert sum(_num_bytes(entry) for entry in disk.directory.iterdir()) <= disk.max_bytes
    assert disk.counters.evictions == 1


def test_a_damaged_disk_copy_is_fetched_again_from_the_source(engine, sources, tmp_path):
    """A copy that passed its checksum when fetched may be damaged on disk later (a crash before the
    data reached the disk): requests must not fail on it for as long as it stays cached."""
    disk = DiskCache(tmp_path / "disk", max_bytes=10 << 20)

    async def scenario() -> None:
        store = AdapterStore(engine.load_adapter, max_cpu_adapters=1, disk=disk)
        store.release(await store.acquire(sources[0], "a0", 1, _checksum(sources[0])))
        store.release(await store.acquire(sources[1], "a1", 1, _checksum(sources[1])))  # a0 leaves memory
        (entry,) = [entry for entry in disk.directory.iterdir() if entry.name.startswith("a0-")]
        (entry / WEIGHTS_FILE).write_bytes(b"\0" * 16)
        adapter, tier = await store.acquire_with_tier(sources[0], "a0", 1, _checksum(sources[0]))
        assert tier == "source" and adapter.name == "a0"
        store.release(adapter)
        assert (entry / WEIGHTS_FILE).stat().st_size == Path(sources[0], WEIGHTS_FILE).stat().st_size

    asyncio.run(scenario())


def test_an_adapter_that_fails_to_load_is_not_advertised_on_disk(engine, tiny_model_dir, tmp_path):
    """The files of an adapter this shard can't load are dropped, not left to advertise it."""
    too_big = str(write_peft_adapter(tmp_path / "r128", tiny_model_dir, rank=128, seed=1))
    disk = DiskCache(tmp_path / "disk", max_bytes=10 << 20)

    async def scenario() -> None:
        store = AdapterStore(engine.load_adapter, max_cpu_adapters=2, disk=disk)
        with pytest.raises(ValueError, match="rank"):
            await store.acquire(too_big, "big", 1, _checksum(too_big))
        assert store.held() == [] and disk.held() == []

    asyncio.run(scenario())


# --- the CPU tier ------------------------------------------------------------------------------------


def test_a_load_dropped_while_it_failed_leaves_no_mark_on_the_retry(engine, sources, tmp_path):
    """An unload (or a delete) during a load that then fails must not make a later, good load of the same
    version be served and thrown away instead of kept."""
    release_load = threading.Event()

    def gated_load(source: str, name: str, version: int) -> LoraAdapter:
        release_load.wait(timeout=10)
        return engine.load_adapter(source, name, version)

    async def scenario() -> None:
        store = AdapterStore(gated_load, max_cpu_adapters=2)
        failing = asyncio.create_task(store.acquire(str(tmp_path / "vanished"), "x", 1))
        await asyncio.sleep(0.05)
        store.drop("x", 1)
        release_load.set()
        with pytest.raises(InvalidAdapter):
            await failing
        store.release(await store.acquire(sources[2], "x", 1))  # the retry, with the source back
        assert store.held() == [("x", 1)]

    asyncio.run(scenario())


# --- following the catalogue -------------------------------------------------------------------------


def test_an_update_while_the_previous_version_loads_serves_it_then_keeps_only_the_new(
    engine, sources, redis_url, namespace
):
    """The request that started on v1 gets v1; once the update event is in, v1 must not stay held (and
    advertised) until a resync, and the new version is warmed in its place."""
    release_v1 = threading.Event()

    def gated_load(source: str, name: str, version: int) -> LoraAdapter:
        if version == 1:
            release_v1.wait(timeout=10)
        return engine.load_adapter(source, name, version)

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        store = AdapterStore(gated_load, max_cpu_adapters=4)
        follower = CatalogueFollower(registry, store, resync_interval_s=3600)
        v1 = await registry.create_adapter(catalogue_record("hot", sources[0], "tiny"))
        request = asyncio.create_task(store.acquire(v1.source, "hot", v1.version, v1.checksum))
        await asyncio.sleep(0.05)
        v2 = await registry.update_adapter(catalogue_record("hot", sources[1], "tiny"))
        await follower.apply({"op": "update", "name": "hot", "version": v2.version})
        release_v1.set()
        adapter = await request
        assert adapter.version == 1, "a request in flight finishes on the version it started with"
        assert await _wait_for(lambda: store.held() == [("hot", 2)]), store.held()
        store.release(adapter)
        assert store.held() == [("hot", 2)]
        await registry.close()

    asyncio.run(scenario())


def test_the_follower_outlives_a_malformed_event_and_follows_the_next(engine, sources, redis_url, namespace):
    """Anyone may publish on the events channel (or a newer writer a shape this one can't read): a
    message the follower can't apply must not end its following for the life of the shard."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        publisher = redis.asyncio.from_url(redis_url)
        store = AdapterStore(engine.load_adapter, max_cpu_adapters=4)
        record = await registry.create_adapter(catalogue_record("gone", sources[3], "tiny"))
        store.release(await store.acquire(record.source, "gone", record.version, record.checksum))
        following = asyncio.create_task(CatalogueFollower(registry, store, resync_interval_s=3600).run())
        while await publisher.publish(registry.events_channel, "not json") == 0:  # nobody listening yet
            await asyncio.sleep(0.01)
        await registry.delete_adapter("gone")
        assert await _wait_for(lambda: store.held() == [], 5), "the delete after it is still followed"
        assert not following.done()
        following.cancel()
        await publisher.aclose()
        await registry.close()

    asyncio.run(scenario())


def test_a_load_whose_requests_all_left_still_keeps_the_cpu_tier_within_its_limit(engine, sources):
    """Clients that time out during a slow load leave it running (others may want it); what it brings
    in must not push the tier past max_cpu_adapters with nothing in use."""
    release_load = threading.Event()

    def gated_load(source: str, name: str, version: int) -> LoraAdapter:
        if name == "slow":
            release_load.wait(timeout=10)
        return engine.load_adapter(source, name, version)

    async def scenario() -> None:
        store = AdapterStore(gated_load, max_cpu_adapters=1)
        store.release(await store.acquire(sources[0], "warm", 1))
        leaving = asyncio.create_task(store.acquire(sources[1], "slow", 1))
        await asyncio.sleep(0.05)
        leaving.cancel()
        release_load.set()
        assert await _wait_for(lambda: not store.loading())
        assert store.held() == [("slow", 1)], "the older idle adapter makes room"

    asyncio.run(scenario())
