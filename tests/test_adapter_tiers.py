"""Adapter tiers: GPU slots (engine), CPU memory and the disk cache (shard), on real adapter files."""

import asyncio
import contextlib
import random
import threading
from collections.abc import AsyncIterator

import grpc
import pytest
import torch

from loraplex.protos.metrics import AdapterLabels
from loraplex.protos.rpc import create_server
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.registry.adapter_config import InvalidAdapter
from loraplex.registry.adapter_source import read_metadata
from loraplex.shard.adapter_slots import NO_SLOT, AdapterSlots
from loraplex.shard.adapter_store import AdapterStore, DiskCache
from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.lora import LoraAdapter
from loraplex.shard.metrics import ShardMetrics
from loraplex.shard.sampling import SamplingParams
from loraplex.shard.service import ShardService

from engine_helpers import tokens
from peft_fixtures import write_peft_adapter


def _fake(name: str) -> LoraAdapter:
    return LoraAdapter(name=name, version=1, rank=1, scaling=1.0, layers=())


def test_slots_evict_the_least_recently_used_idle_adapter():
    slots = AdapterSlots(2)
    a, b, c = _fake("a"), _fake("b"), _fake("c")
    slot_a, slot_b = slots.acquire(a), slots.acquire(b)
    slots.release(slot_a)
    slots.release(slot_b)
    assert slots.acquire(a) == slot_a  # a hit, and now the most recently used
    slots.release(slot_a)
    assert slots.acquire(c) == slot_b  # b was the least recently used
    assert [x.name for x in slots.held()] == ["a", "c"]  # by slot
    assert (slots.counters.hits, slots.counters.misses, slots.counters.evictions) == (1, 3, 1)


def test_a_slot_in_use_is_never_taken_and_requests_wait_for_one():
    slots = AdapterSlots(1)
    busy = slots.acquire(_fake("busy"))
    assert slots.acquire(_fake("other")) == NO_SLOT
    slots.release(busy)
    assert slots.acquire(_fake("other")) == busy


def test_dropping_a_busy_adapter_frees_its_slot_when_its_last_user_leaves():
    slots = AdapterSlots(2)
    adapter = _fake("going")
    slot = slots.acquire(adapter)
    slots.drop(adapter.uid)
    assert slots.in_use(adapter.uid)
    slots.release(slot)
    assert slots.held() == []


def test_a_dropped_adapter_taken_again_by_a_waiting_request_leaves_its_slot_when_that_ends():
    """An update drops version 1 while a request for it still waits: it may still run on its copy,
    but the copy must not stay in a slot (and be advertised at GPU tier) afterwards."""
    slots = AdapterSlots(2)
    old = _fake("x")
    slots.release(slots.acquire(old))
    slots.drop(old.uid)  # idle: freed at once
    assert slots.held() == []
    late = slots.acquire(old)  # the request still waiting for the old version is admitted
    assert slots.held() == [old]
    slots.release(late)
    assert slots.held() == []


def test_an_adapter_dropped_while_busy_leaves_its_slot_each_time_it_goes_idle():
    slots = AdapterSlots(2)
    old = _fake("x")
    running = slots.acquire(old)
    slots.drop(old.uid)
    slots.release(running)
    slots.release(slots.acquire(old))
    assert slots.held() == []


@pytest.fixture(scope="module")
def tiny_engine(tiny_model_dir):
    return Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=16 << 20, max_gpu_adapters=4))


@pytest.fixture(scope="module")
def fifty_adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("fifty")
    targets = [("q_proj", "v_proj"), ("o_proj", "down_proj"), ("gate_proj", "up_proj", "k_proj")]
    return [
        write_peft_adapter(
            root / f"a{i}", tiny_model_dir, rank=(4, 8, 16)[i % 3], targets=targets[i % 3], seed=i, scale=0.5
        )
        for i in range(50)
    ]


def test_torch_path_packs_on_load_so_taking_a_slot_only_swaps(tiny_engine, fifty_adapters):
    """Packing is the costly part of a slot write on CPU; it runs where the adapter is loaded (a loader
    thread), never on the engine thread, and leaves with the adapter's CPU-tier copy."""
    weights = tiny_engine.lora_weights
    adapter = tiny_engine.load_adapter(str(fifty_adapters[0]), "packed-early", 1)
    prepared = weights._prepared[adapter.uid]
    assert prepared, "the adapter targets q and v, so qkv_proj is packed for every layer"
    slot = tiny_engine.slots.acquire(adapter)
    assert weights.slots[slot] is prepared
    tiny_engine.slots.release(slot)
    tiny_engine.slots.drop(adapter.uid)
    tiny_engine.drop_adapter(adapter.uid)
    assert adapter.uid not in weights._prepared


def _store(engine: Engine, max_cpu: int, disk: DiskCache | None = None) -> AdapterStore:
    return AdapterStore(
        engine.load_adapter,
        max_cpu,
        disk,
        on_evict=lambda adapter: engine.slots.drop(adapter.uid),
    )


def test_fifty_adapters_in_random_order_through_4_slots_and_8_cpu_entries(
    tiny_engine, tiny_model_dir, fifty_adapters
):
    """Every request completes with the tokens its adapter gives when nothing is evicted."""
    roomy = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=16 << 20, max_gpu_adapters=64))
    order = list(range(50)) * 2  # every adapter twice, in random order
    random.Random(0).shuffle(order)
    prompt = [11, 12, 13, 14, 15]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)

    async def run(engine: Engine, store: AdapterStore) -> dict[int, list[int]]:
        results = {}
        for batch_start in range(0, len(order), 16):  # 16 requests share each batch
            batch = order[batch_start : batch_start + 16]
            adapters = [await store.acquire(str(fifty_adapters[i]), f"a{i}", 1) for i in batch]
            requests = [
                EngineRequest(f"{batch_start + k}", prompt, params, adapter=adapter)
                for k, adapter in enumerate(adapters)
            ]
            outputs = engine.generate(requests)
            for k, (index, adapter) in enumerate(zip(batch, adapters, strict=True)):
                results.setdefault(index, tokens(outputs[f"{batch_start + k}"]))
                assert tokens(outputs[f"{batch_start + k}"]) == results[index], f"adapter {index} changed"
                store.release(adapter)
            assert len(store.held()) <= store.max_cpu_adapters
        return results

    small_store = _store(tiny_engine, max_cpu=8)
    constrained = asyncio.run(run(tiny_engine, small_store))
    expected = asyncio.run(run(roomy, _store(roomy, max_cpu=64)))
    assert constrained == expected
    assert len(set(map(tuple, expected.values()))) > 10, "the adapters should give different outputs"
    assert tiny_engine.slots.counters.evictions > 0 and small_store.counters.evictions > 0
    assert tiny_engine.blocks.num_used_blocks == 0


def test_the_cpu_tier_keeps_adapters_in_use_and_evicts_idle_ones_lru(tiny_engine, fifty_adapters):
    async def scenario() -> None:
        store = _store(tiny_engine, max_cpu=2)
        first = await store.acquire(str(fifty_adapters[0]), "a0", 1)  # held throughout
        second = await store.acquire(str(fifty_adapters[1]), "a1", 1)
        store.release(second)
        third = await store.acquire(str(fifty_adapters[2]), "a2", 1)
        assert store.held() == [("a0", 1), ("a2", 1)]  # a1 was idle and least recent
        fourth = await store.acquire(str(fifty_adapters[3]), "a3", 1)
        assert ("a0", 1) in store.held() and len(store.held()) == 3  # over the limit: all three in use
        for adapter in (first, third, fourth):
            store.release(adapter)
        assert len(store.held()) == 2

    asyncio.run(scenario())


def test_concurrent_requests_load_a_cold_adapter_once(tiny_engine, fifty_adapters):
    async def scenario() -> None:
        store = _store(tiny_engine, max_cpu=4)
        adapters = await asyncio.gather(*(store.acquire(str(fifty_adapters[5]), "a5", 1) for _ in range(6)))
        assert all(adapter is adapters[0] for adapter in adapters)
        assert (store.counters.misses, store.counters.hits) == (1, 0)

    asyncio.run(scenario())


def test_an_adapter_deleted_while_it_loads_serves_its_waiters_but_is_not_kept(tiny_engine, fifty_adapters):
    """A delete event can arrive while the adapter's load (on a worker thread) is still running."""
    release_load = threading.Event()
    evicted: list[LoraAdapter] = []

    def slow_load(source: str, name: str, version: int) -> LoraAdapter:
        release_load.wait(timeout=10)
        return tiny_engine.load_adapter(source, name, version)

    async def scenario() -> None:
        store = AdapterStore(slow_load, 4, on_evict=evicted.append)
        waiting = asyncio.ensure_future(store.acquire(str(fifty_adapters[6]), "a6", 1))
        await asyncio.sleep(0.05)
        assert store.drop("a6") == []  # nothing loaded yet
        release_load.set()
        adapter = await waiting
        assert adapter.name == "a6", "the request that asked still gets its adapter"
        store.release(adapter)
        assert store.held() == [] and evicted == [adapter]

    asyncio.run(scenario())


def test_the_disk_cache_serves_repeat_loads_and_checks_the_checksum(tiny_engine, fifty_adapters, tmp_path):
    disk = DiskCache(tmp_path / "disk", max_bytes=10 << 20)
    source = str(fifty_adapters[7])
    checksum = read_metadata(source).checksum

    async def scenario() -> None:
        store = _store(tiny_engine, max_cpu=1, disk=disk)
        store.release(await store.acquire(source, "a7", 1, checksum))
        store.release(
            await store.acquire(
                str(fifty_adapters[8]), "a8", 1, read_metadata(str(fifty_adapters[8])).checksum
            )
        )
        again = await store.acquire(source, "a7", 1, checksum)  # evicted from CPU, found on disk
        assert (disk.counters.misses, disk.counters.hits) == (2, 1)
        assert torch.equal(
            again.layers[0]["o_proj"][0], tiny_engine.load_adapter(source, "x", 1).layers[0]["o_proj"][0]
        )
        with pytest.raises(InvalidAdapter, match="changed since the adapter was registered"):
            await store.acquire(source, "a7", 2, "0" * 64)

    asyncio.run(scenario())
    assert disk.held() == [("a7", 1), ("a8", 1)]


def test_the_disk_cache_stays_under_its_size_cap(fifty_adapters, tmp_path):
    newest = sum(f.stat().st_size for f in fifty_adapters[4].iterdir())
    disk = DiskCache(tmp_path / "disk", max_bytes=int(2.5 * newest))  # a2 alone is larger: never kept
    for i in range(5):
        disk.local_copy(str(fifty_adapters[i]), f"a{i}", 1, read_metadata(str(fifty_adapters[i])).checksum)
    entries = [e for e in (tmp_path / "disk").iterdir() if not e.name.startswith(".")]
    assert len(entries) <= 3 and disk.counters.evictions >= 2
    assert sum(f.stat().st_size for e in entries for f in e.iterdir()) <= disk.max_bytes
    assert any(e.name.startswith("a4-v1-") for e in entries)  # the newest stays


def test_a_cancelled_request_does_not_cancel_the_load_others_wait_for(tiny_engine, fifty_adapters):
    async def scenario() -> None:
        store = _store(tiny_engine, max_cpu=4)
        first = asyncio.create_task(store.acquire(str(fifty_adapters[9]), "a9", 1))
        second = asyncio.create_task(store.acquire(str(fifty_adapters[9]), "a9", 1))
        await asyncio.sleep(0)  # both are waiting on the one load
        first.cancel()
        adapter = await second
        assert adapter.name == "a9" and store.held() == [("a9", 1)]
        store.release(adapter)

    asyncio.run(scenario())


def test_a_call_waiting_for_its_adapter_load_counts_in_the_shards_load(tiny_engine, fifty_adapters):
    """Routers weigh shards by the outstanding requests they report: a call still waiting for its cold
    adapter has not reached the engine yet, but the shard has taken it on, so it counts as waiting."""
    release_load = threading.Event()

    def slow_load(source: str, name: str, version: int) -> LoraAdapter:
        release_load.wait(timeout=10)
        return tiny_engine.load_adapter(source, name, version)

    async def waiting_requests(stub: shard_pb2_grpc.ShardStub, expected: int) -> int:
        for _ in range(100):
            status = await stub.Status(shard_pb2.ShardStatusRequest())
            if status.waiting_requests == expected:
                break
            await asyncio.sleep(0.05)
        return status.waiting_requests

    async def scenario() -> None:
        store = AdapterStore(slow_load, 4)
        metrics = ShardMetrics(tiny_engine, store, AdapterLabels())
        service = ShardService(tiny_engine, store, "s0", "here", "tiny", metrics)
        awaiting_gauge = "loraplex_shard_adapter_load_waiting_requests"
        try:
            async with _serving(service) as stub:
                assert await waiting_requests(stub, 0) == 0
                record = common_pb2.Adapter(name="a9", source=str(fifty_adapters[9]), version=1)
                request = common_pb2.GenerateRequest(adapter="a9", prompt="hi")
                call = stub.Generate(shard_pb2.ShardGenerateRequest(request=request, adapter=record))
                assert await waiting_requests(stub, 1) == 1, "the call waiting for its adapter"
                assert service.waiting_requests(tiny_engine.stats) == 1
                assert metrics.registry.get_sample_value(awaiting_gauge) == 1, "and in the shard's metrics"
                call.cancel()
                release_load.set()
                assert await waiting_requests(stub, 0) == 0, "counted no longer once it left"
                assert metrics.registry.get_sample_value(awaiting_gauge) == 0
        finally:
            release_load.set()

    asyncio.run(scenario())


def test_a_name_and_version_back_with_other_weights_is_reloaded_not_served_stale(tiny_engine, fifty_adapters):
    """A reset registry may issue (name, version) again for other weights: the record's checksum tells."""
    old_source, new_source = str(fifty_adapters[10]), str(fifty_adapters[13])  # both adapt o_proj
    evicted: list[LoraAdapter] = []

    async def scenario() -> None:
        store = AdapterStore(tiny_engine.load_adapter, 4, on_evict=evicted.append)
        old = await store.acquire(old_source, "reused", 1, read_metadata(old_source).checksum)
        store.release(old)
        new = await store.acquire(new_source, "reused", 1, read_metadata(new_source).checksum)
        expected = tiny_engine.load_adapter(new_source, "x", 1).layers[0]["o_proj"][0]
        assert torch.equal(new.layers[0]["o_proj"][0], expected), "the new record's weights are served"
        assert evicted == [old] and store.held() == [("reused", 1)]
        store.release(new)

    asyncio.run(scenario())


def test_concurrent_fetches_into_a_full_disk_cache_all_succeed(fifty_adapters, tmp_path):
    """Loads run on several loader threads at once; each one's fetch evicts and sizes the cache. One
    thread's bookkeeping must never trip over an entry another thread has just evicted."""
    sources = [str(path) for path in fifty_adapters[:12]]
    checksums = [read_metadata(source).checksum for source in sources]
    largest = max(sum(f.stat().st_size for f in path.iterdir()) for path in fifty_adapters[:12])
    disk = DiskCache(tmp_path / "disk", max_bytes=3 * largest)
    failures: list[BaseException] = []

    def fetch_all(thread: int) -> None:
        for round_ in range(3):
            for i, (source, checksum) in enumerate(zip(sources, checksums, strict=True)):
                try:
                    disk.fetch(source, f"t{thread}-r{round_}-a{i}", 1, checksum)
                except Exception as error:  # every failure is collected and reported
                    failures.append(error)

    threads = [threading.Thread(target=fetch_all, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert disk.counters.misses == 4 * 3 * 12 and disk.counters.evictions > 0
    left = [e for e in (tmp_path / "disk").iterdir()]
    assert sum(f.stat().st_size for e in left for f in e.iterdir()) <= 3 * largest
    assert all(not e.name.startswith(".") for e in left), "no staging copy is left behind"


def test_a_disk_entry_being_read_into_memory_is_not_evicted_by_another_load(
    tiny_engine, fifty_adapters, tmp_path
):
    """The disk tier hands a load the entry's path; a second load filling the cache meanwhile (on
    another loader thread) must not evict the entry before the first has read it."""
    first, second = str(fifty_adapters[1]), str(fifty_adapters[2])
    disk = DiskCache(tmp_path / "disk", max_bytes=1)  # room for no entry but the newest

    def load_while_another_fetches(local: str, name: str, version: int) -> LoraAdapter:
        if name == "a1":
            other = threading.Thread(
                target=disk.fetch, args=(second, "a2", 1, read_metadata(second).checksum)
            )
            other.start()
            other.join()
        return tiny_engine.load_adapter(local, name, version)

    async def scenario() -> LoraAdapter:
        store = AdapterStore(load_while_another_fetches, 4, disk)
        return await store.acquire(first, "a1", 1, read_metadata(first).checksum)

    adapter = asyncio.run(scenario())
    expected = tiny_engine.load_adapter(first, "x", 1).layers[0]["o_proj"][0]  # a1 adapts o and down
    assert torch.equal(adapter.layers[0]["o_proj"][0], expected)


def test_dropping_an_adapter_leaves_the_disk_copies_of_names_that_extend_its_name(fifty_adapters, tmp_path):
    """Names may hold "-": dropping a v1 must not take the files of "a-v1-b" v3 with it."""
    disk = DiskCache(tmp_path / "disk", max_bytes=10 << 20)
    short, longer = str(fifty_adapters[3]), str(fifty_adapters[4])
    disk.fetch(short, "a", 1, read_metadata(short).checksum)
    disk.fetch(longer, "a-v1-b", 3, read_metadata(longer).checksum)
    disk.drop("a", 1)
    assert disk.held() == [("a-v1-b", 3)]
    assert disk.fetch(longer, "a-v1-b", 3, read_metadata(longer).checksum)[1], "still a hit"
    assert not disk.fetch(short, "a", 1, read_metadata(short).checksum)[1], "fetched again"


def test_an_adapter_just_loaded_for_a_waiting_request_is_not_evicted_before_it_resumes(
    tiny_engine, fifty_adapters
):
    """The load puts the adapter in the CPU tier a moment before its waiting request resumes; a CPU
    hit for another adapter in that moment evicts past the limit and must not pick the new one."""
    release_load = threading.Event()
    evicted: list[LoraAdapter] = []

    def gated_load(source: str, name: str, version: int) -> LoraAdapter:
        if name == "q":
            release_load.wait(timeout=10)
        return tiny_engine.load_adapter(source, name, version)

    async def scenario() -> None:
        store = AdapterStore(gated_load, max_cpu_adapters=1, on_evict=evicted.append)
        p = await store.acquire(str(fifty_adapters[5]), "p", 1)  # in use by a running request
        waiting = asyncio.create_task(store.acquire(str(fifty_adapters[6]), "q", 1))
        await asyncio.sleep(0.05)
        release_load.set()
        while ("q", 1) not in store.held():  # loaded; the waiting request has not resumed yet
            await asyncio.sleep(0)
        assert not waiting.done()
        p_again = await store.acquire(str(fifty_adapters[5]), "p", 1)  # a CPU hit, then an eviction pass
        q = await waiting
        assert evicted == [] and sorted(store.held()) == [("p", 1), ("q", 1)]
        for adapter in (p, p_again, q):
            store.release(adapter)
        assert len(store.held()) == 1 and len(evicted) == 1  # back under the limit once all are idle

    asyncio.run(scenario())


def test_a_name_and_version_back_with_other_weights_shares_no_prefix_cache(tiny_engine, fifty_adapters):
    """K/V cached under one adapter's weights are reused by later requests of that same copy only,
    never by other weights served under the same (name, version)."""
    old = tiny_engine.load_adapter(str(fifty_adapters[10]), "reused", 1)
    new = tiny_engine.load_adapter(str(fifty_adapters[13]), "reused", 1)
    prompt = list(range(5, 5 + 3 * tiny_engine.blocks.block_size + 1))

    def prefix_hits(adapter: LoraAdapter, request_id: str) -> int:
        before = tiny_engine.stats.num_prefix_hit_tokens
        request = EngineRequest(request_id, prompt, SamplingParams(max_new_tokens=1), adapter=adapter)
        tiny_engine.generate([request])
        return tiny_engine.stats.num_prefix_hit_tokens - before

    prefix_hits(old, "old")
    assert prefix_hits(new, "new") == 0, "other weights compute their own K/V"
    assert prefix_hits(old, "old-again") == 3 * tiny_engine.blocks.block_size, "the same copy reuses its own"


def test_load_and_unload_adapter_over_grpc(tiny_engine, fifty_adapters, tmp_path):
    """The shard's own LoadAdapter / UnloadAdapter: a load answers with the tier it left the adapter in;
    an unload of a load still under way answers OK and the load is not kept; an unload of what is not
    there is NOT_FOUND; a load without a source is INVALID_ARGUMENT."""
    release_load = threading.Event()

    def load(source: str, name: str, version: int) -> LoraAdapter:
        if name == "slow":
            release_load.wait(timeout=10)
        return tiny_engine.load_adapter(source, name, version)

    def record(name: str, index: int) -> common_pb2.Adapter:
        source = str(fifty_adapters[index])
        return common_pb2.Adapter(
            name=name, source=source, version=1, checksum=read_metadata(source).checksum
        )

    async def tiers(stub: shard_pb2_grpc.ShardStub) -> list[int]:
        """The tiers Status reports for this test's adapter (the shared engine's slots hold others)."""
        status = await stub.Status(shard_pb2.ShardStatusRequest())
        return [placement.tier for placement in status.adapters if placement.adapter == "grpc-loaded"]

    async def code(call) -> grpc.StatusCode:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return caught.value.code()

    async def scenario() -> None:
        store = AdapterStore(load, 4, disk=DiskCache(tmp_path / "disk", max_bytes=1 << 30))
        service = ShardService(tiny_engine, store, "s0", "here", "tiny", None)
        async with _serving(service) as stub:
            loaded = await stub.LoadAdapter(shard_pb2.LoadAdapterRequest(adapter=record("grpc-loaded", 0)))
            assert loaded.tier == common_pb2.TIER_CPU and loaded.load_ms > 0
            assert await tiers(stub) == [common_pb2.TIER_CPU]
            await stub.UnloadAdapter(shard_pb2.UnloadAdapterRequest(name="grpc-loaded"))
            assert await tiers(stub) == []
            unload_again = stub.UnloadAdapter(shard_pb2.UnloadAdapterRequest(name="grpc-loaded"))
            assert await code(unload_again) == grpc.StatusCode.NOT_FOUND
            no_source = shard_pb2.LoadAdapterRequest(adapter=common_pb2.Adapter(name="x"))
            assert await code(stub.LoadAdapter(no_source)) == grpc.StatusCode.INVALID_ARGUMENT

            slow = asyncio.ensure_future(
                stub.LoadAdapter(shard_pb2.LoadAdapterRequest(adapter=record("slow", 1)))
            )
            for _ in range(100):
                if store.loading():
                    break
                await asyncio.sleep(0.02)
            await stub.UnloadAdapter(shard_pb2.UnloadAdapterRequest(name="slow", version=1))
            release_load.set()
            assert (await slow).tier == common_pb2.TIER_UNSPECIFIED  # answered, and held nowhere
            assert store.held() == [], "a load unloaded while under way is not kept"

    asyncio.run(scenario())


@contextlib.asynccontextmanager
async def _serving(service: ShardService) -> AsyncIterator[shard_pb2_grpc.ShardStub]:
    """The service on a loopback gRPC server, and a stub calling it."""
    server, port, _ = create_server("127.0.0.1:0", [])
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield shard_pb2_grpc.ShardStub(channel)
    finally:
        await server.stop(None)
