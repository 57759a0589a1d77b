"""Routing across a real mesh: a private redis-server, 3 shard processes on the tiny model and 2
router processes. Affinity and agreement between routers, the load bound under concurrency, a Redis
outage, a shard frozen and a shard killed under load. The tests run in file order; the last one kills a
shard."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections import Counter, defaultdict

import grpc
import numpy as np
import pytest

from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from loraplex.registry.store import Registry
from loraplex.tools.local_mesh import Mesh, start_mesh
from loraplex.tools.processes import free_port, start_redis, stop_all

from peft_fixtures import write_peft_adapter

NUM_ADAPTERS = 30
HEARTBEAT_TTL_S = 3.0
SHARD_KEEPALIVE_S = 1.0
NAMESPACE = "routing-test"


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("routing-redis")
    port = free_port()
    process = start_redis(port, workdir, workdir / "redis.log")
    yield process, f"redis://127.0.0.1:{port}/0"
    stop_all([process])


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, redis_server, tmp_path_factory):
    _, url = redis_server
    logs = tmp_path_factory.mktemp("routing-logs")
    mesh = start_mesh(
        tiny_model_dir,
        url,
        NAMESPACE,
        logs,
        num_shards=3,
        heartbeat_ttl=HEARTBEAT_TTL_S,  # a heartbeat every 0.6 s
        num_routers=2,
        router_args=("--refresh-interval", "0.25", "--shard-keepalive", str(SHARD_KEEPALIVE_S)),
    )
    sources = tmp_path_factory.mktemp("routing-adapters")
    with grpc.insecure_channel(mesh.router) as channel:
        admin = adapters_pb2_grpc.AdaptersStub(channel)
        for i in range(NUM_ADAPTERS):
            source = write_peft_adapter(
                sources / f"a{i}", tiny_model_dir, rank=4, targets=("q_proj",), seed=i
            )
            admin.Create(adapters_pb2.CreateAdapterRequest(name=f"a{i}", source=str(source)), timeout=30)
    for address in mesh.routers:  # the other router learns of the catalogue at its next refresh
        _wait_until_routable(address, f"a{NUM_ADAPTERS - 1}")
    yield mesh
    mesh.stop()


def _wait_until_routable(address: str, adapter: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        while True:
            try:
                generation.Generate(_request(adapter), timeout=60)
                return
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.NOT_FOUND or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)


@pytest.fixture(scope="module")
def routers(mesh):
    channels = [grpc.insecure_channel(address) for address in mesh.routers]
    yield [generation_pb2_grpc.GenerationStub(channel) for channel in channels]
    for channel in channels:
        channel.close()


def _request(adapter: str, max_new_tokens: int = 2) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        prompt_token_ids=[5, 17, 42, 99],
        adapter=adapter,
        parameters=common_pb2.SamplingParameters(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def _outstanding(mesh: Mesh) -> dict[str, int]:
    """Each live shard's running + waiting requests, from its own Status."""
    loads = {}
    for shard_id, address in mesh.shards.items():
        if mesh.processes[shard_id].poll() is not None:
            continue
        with grpc.insecure_channel(address) as channel:
            status = shard_pb2_grpc.ShardStub(channel).Status(shard_pb2.ShardStatusRequest(), timeout=5)
        loads[shard_id] = status.running_requests + status.waiting_requests
    return loads


def test_each_adapter_sticks_to_one_shard_and_both_routers_agree(mesh, routers):
    served: dict[str, list[str]] = defaultdict(list)
    disagreements = 0
    for _ in range(2):
        for i in range(NUM_ADAPTERS):
            picks = [router.Generate(_request(f"a{i}"), timeout=60).served_by.shard for router in routers]
            served[f"a{i}"] += picks
            disagreements += picks[0] != picks[1]
    majority = {adapter: Counter(shards).most_common(1)[0] for adapter, shards in served.items()}
    on_majority = sum(count for _, count in majority.values()) / (4 * NUM_ADAPTERS)
    assert on_majority >= 0.9, f"only {on_majority:.0%} of requests went to their adapter's usual shard"
    assert disagreements <= 0.1 * 2 * NUM_ADAPTERS, (
        f"the routers disagreed on {disagreements} pairs: {served}"
    )
    homes = Counter(shard for shard, _ in majority.values())
    assert set(homes) == set(mesh.shards) and min(homes.values()) >= 4, f"adapter homes: {dict(homes)}"


def test_concurrent_load_stays_within_the_bound(mesh, routers):
    """24 streams in flight through both routers, adapters drawn by popularity (Zipf 1.0). Sampled
    request counts must stay near the bound max(1.25 x mean, mean + 1, 2). Not exactly within it: the
    routers do not coordinate (each sees the other's calls through heartbeats, every 0.6 s here, its
    registry refresh, every 0.25 s, and the load a shard reports as each of its own calls ends), and
    the bound is on load that blends requests with queued tokens, so a shard of nearly finished
    requests may take more. Measured on 2 cores over 7 runs: the median sample at 0.91-1.03x the
    bound, the 90th percentile at 1.09-1.33x (with heartbeats alone: 0.94-1.28x and 1.04-1.53x, one
    run in 8 over these limits)."""
    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, NUM_ADAPTERS + 1)
    adapters = rng.choice(NUM_ADAPTERS, size=240, p=weights / weights.sum())
    pending = iter(enumerate(adapters))
    lock = threading.Lock()
    errors: list[grpc.RpcError] = []
    done = threading.Event()

    def client(router) -> None:
        while True:
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                router.Generate(_request(f"a{item[1]}", max_new_tokens=24), timeout=120)
            except grpc.RpcError as error:
                errors.append(error)

    samples: list[dict[str, int]] = []

    def sample() -> None:
        while not done.wait(0.1):
            samples.append(_outstanding(mesh))

    threads = [threading.Thread(target=client, args=(routers[i % 2],)) for i in range(24)]
    sampler = threading.Thread(target=sample)
    sampler.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    sampler.join()
    assert not errors, [error.details() for error in errors[:3]]
    busy = [loads for loads in samples if sum(loads.values()) >= 12]
    assert len(busy) >= 5, f"too few busy samples to judge the bound: {samples}"
    ratios = []
    for loads in busy:
        mean = sum(loads.values()) / len(loads)
        ratios.append(max(loads.values()) / max(1.25 * mean, mean + 1, 2))
    assert np.median(ratios) <= 1.25, f"max load / bound per sample: {sorted(ratios)}"
    assert np.percentile(ratios, 90) <= 1.5, f"max load / bound per sample: {sorted(ratios)}"


def test_routing_survives_a_redis_outage(mesh, routers, redis_server, tiny_model_dir, tmp_path):
    """redis-server frozen for 10 s under load: requests for known adapters keep being routed, admin
    writes fail with UNAVAILABLE, and both work again once Redis is back."""
    process, _ = redis_server
    stop = threading.Event()
    completed: list[float] = []
    errors: list[grpc.RpcError] = []

    def client(router, index: int) -> None:
        while not stop.is_set():
            try:
                router.Generate(_request(f"a{index % NUM_ADAPTERS}"), timeout=60)
                completed.append(time.monotonic())
            except grpc.RpcError as error:
                errors.append(error)
            index += 1

    threads = [threading.Thread(target=client, args=(routers[i % 2], i)) for i in range(4)]
    for thread in threads:
        thread.start()
    source = write_peft_adapter(tmp_path / "late", tiny_model_dir, rank=4, targets=("q_proj",))
    admin = adapters_pb2_grpc.AdaptersStub(grpc.insecure_channel(mesh.router))
    os.kill(process.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    try:
        with pytest.raises(grpc.RpcError) as raised:
            admin.Create(adapters_pb2.CreateAdapterRequest(name="late", source=str(source)), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "registry" in raised.value.details() and "Get before retrying" in raised.value.details()
        with pytest.raises(grpc.RpcError) as raised:  # a read changes nothing: no Get to check with
            admin.List(adapters_pb2.ListAdaptersRequest(), timeout=30)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert raised.value.details().endswith("retry later"), raised.value.details()
        time.sleep(max(0.0, 10 - (time.monotonic() - frozen_at)))
    finally:
        thawed_at = time.monotonic()
        os.kill(process.pid, signal.SIGCONT)
    during = [t for t in completed if frozen_at + 1 < t < thawed_at]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            admin.Create(adapters_pb2.CreateAdapterRequest(name="late", source=str(source)), timeout=10)
            break
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.ALREADY_EXISTS:
                break  # the write sent into the frozen Redis was applied when it woke: as its error warned
            time.sleep(0.5)
    else:
        pytest.fail("admin calls did not recover within 20 s of Redis coming back")
    time.sleep(2)
    stop.set()
    for thread in threads:
        thread.join()
    after = [t for t in completed if t > thawed_at + 1]
    assert not errors, [error.details() for error in errors[:3]]
    assert len(during) >= 10, f"{len(during)} requests completed during the outage"
    assert after, "no request completed after Redis came back"
    assert routers[1].Generate(_request("late"), timeout=60).served_by.adapter == "late"


def _streams_through(routers, fault, request_timeout_s: float = 120.0) -> list[tuple[int, str]]:
    """16 clients run 3 streams each, 64 tokens, through both routers; `fault()` runs 1 s in. Each
    stream's (chunks received, "ok" or its status code name)."""
    outcomes: list[tuple[int, str]] = []
    lock = threading.Lock()

    def client(router, index: int) -> None:
        for round_ in range(3):
            chunks = 0
            try:
                request = _request(f"a{(index + 7 * round_) % NUM_ADAPTERS}", max_new_tokens=64)
                for _ in router.GenerateStream(request, timeout=request_timeout_s):
                    chunks += 1
                outcome = "ok"
            except grpc.RpcError as error:
                outcome = error.code().name
            with lock:
                outcomes.append((chunks, outcome))

    threads = [threading.Thread(target=client, args=(routers[i % 2], i)) for i in range(16)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    fault()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 48
    return outcomes


def _check_only_started_streams_failed(outcomes: list[tuple[int, str]]) -> None:
    failed_before_a_token = [outcome for chunks, outcome in outcomes if outcome != "ok" and chunks == 0]
    assert not failed_before_a_token, f"requests failed before any token: {failed_before_a_token}"
    assert all(outcome in ("ok", "UNAVAILABLE") for _, outcome in outcomes), Counter(o for _, o in outcomes)


def _live_ids(url: str) -> set[str]:
    async def read() -> set[str]:
        registry = Registry(url, NAMESPACE)
        try:
            return {shard.shard_id for shard in await registry.live_shards()}
        finally:
            await registry.close()

    return asyncio.run(read())


def test_a_frozen_shard_is_given_up_within_the_keepalive(mesh, routers, redis_server):
    """SIGSTOP the busiest shard while 16 streams run. Frozen, it keeps its connections open and
    answers nothing, so only the routers' keepalive pings (every SHARD_KEEPALIVE_S of silence, an
    answer due within half that) can tell: every request that had not received a token completes on
    another shard, the rest end with UNAVAILABLE, and none waits for its 60 s deadline. Thawed, the
    shard heartbeats again and rejoins."""
    _, url = redis_server
    victim = ""

    def freeze() -> None:
        nonlocal victim
        victim = max(_outstanding(mesh).items(), key=lambda item: item[1])[0]
        os.kill(mesh.processes[victim].pid, signal.SIGSTOP)

    started = time.monotonic()
    try:
        outcomes = _streams_through(routers, freeze, request_timeout_s=60)
    finally:
        if victim:
            os.kill(mesh.processes[victim].pid, signal.SIGCONT)
    elapsed = time.monotonic() - started
    _check_only_started_streams_failed(outcomes)
    assert elapsed < 40, f"the streams took {elapsed:.0f} s: requests waited on the frozen shard"
    deadline = time.monotonic() + 10
    while victim not in _live_ids(url):
        assert time.monotonic() < deadline, f"{victim} did not rejoin after it was thawed"
        time.sleep(0.2)


def test_killing_a_shard_under_load_fails_only_streams_that_had_started(mesh, routers, redis_server):
    """kill -9 the busiest shard while 16 streams run: every request that had not received a token
    completes on another shard; the rest end with UNAVAILABLE; the shard leaves the membership within
    its heartbeat TTL."""
    _, url = redis_server
    victim = ""
    killed_at = 0.0

    def kill() -> None:
        nonlocal victim, killed_at
        victim = max(_outstanding(mesh).items(), key=lambda item: item[1])[0]
        mesh.processes[victim].kill()
        killed_at = time.monotonic()

    _check_only_started_streams_failed(_streams_through(routers, kill))
    while victim in _live_ids(url):
        assert time.monotonic() - killed_at < HEARTBEAT_TTL_S + 1, f"{victim} is still a member"
        time.sleep(0.2)
    assert routers[0].Generate(_request("a0"), timeout=60).served_by.shard != victim
