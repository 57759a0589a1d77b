"""A shard's life around its engine: start-up failures, its registry membership while Redis comes and
goes, and heartbeats that outlive errors (in-process shards on the tiny model, a real redis-server)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.protos.generate_many import DRAINING_MESSAGE
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.registry.records import ShardRecord
from loraplex.registry.store import Registry
from loraplex.shard import server as shard_server
from loraplex.shard.engine import EngineConfig
from loraplex.shard.server import ShardConfig, ShardFailed, serve
from loraplex.tools.processes import free_port

from peft_fixtures import write_peft_adapter

BASE_REQUEST = shard_pb2.ShardGenerateRequest(
    request=common_pb2.GenerateRequest(
        prompt_token_ids=[5, 6, 7],
        parameters=common_pb2.SamplingParameters(max_new_tokens=3, ignore_eos=True),
    )
)


def shard_config(model_dir: Path, redis_url: str, namespace: str, tmp_path: Path, **options) -> ShardConfig:
    return ShardConfig(
        shard_id="lifecycle",
        model=str(model_dir),
        cache_dir=tmp_path / "cache",
        redis_url=redis_url,
        port=options.pop("port", free_port()),
        namespace=namespace,
        engine=EngineConfig(kv_cache_bytes=16 << 20),
        heartbeat_interval_s=0.2,
        heartbeat_ttl_s=1.0,
        **options,
    )


@asynccontextmanager
async def running_shard_channel(config: ShardConfig, task: asyncio.Task) -> AsyncIterator[grpc.aio.Channel]:
    """A channel to the shard that `task` serves, once it reports SERVING."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            if task.done():
                task.result()  # its start-up error
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
        yield channel


@asynccontextmanager
async def running_shard(config: ShardConfig) -> AsyncIterator[str]:
    """The shard serving in this loop (its address once SERVING); stopped, and its end checked, on exit."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    async with running_shard_channel(config, task):
        pass
    try:
        yield f"127.0.0.1:{config.port}"
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=30)


async def wait_for_record(registry: Registry, shard_id: str, timeout_s: float = 5.0) -> ShardRecord:
    """The shard's heartbeat record once the registry has one, else fail after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        try:
            for record in await registry.live_shards():
                if record.shard_id == shard_id:
                    return record
        except OSError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError(f"shard {shard_id} did not heartbeat into the registry within {timeout_s:g} s")


def engine_threads() -> int:
    return sum(thread.name == "engine" for thread in threading.enumerate())


def test_an_adapter_listed_twice_to_preload_is_refused_at_start(tmp_path, namespace):
    config = ShardConfig(
        shard_id="twice",
        model="never-loaded",
        cache_dir=tmp_path,
        redis_url="redis://127.0.0.1:1/0",
        preload=(("support", "/adapters/a"), ("other", "/adapters/o"), ("support", "/adapters/b")),
    )
    with pytest.raises(ShardFailed, match=r"'support' is listed twice .*/adapters/a and /adapters/b"):
        asyncio.run(serve(config, asyncio.Event()))


def test_a_preloaded_adapter_named_as_the_base_model_is_refused_at_start(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    """The REST gateway reads "tgi" (and the model's own name, "base", "dummy") as the base model: a
    preloaded adapter by that name could be reached over gRPC only."""
    write_peft_adapter(tmp_path / "a", tiny_model_dir, seed=1)
    config = shard_config(
        tiny_model_dir, redis_url, namespace, tmp_path, preload=(("tgi", str(tmp_path / "a")),)
    )
    with pytest.raises(ShardFailed, match=r"cannot preload adapter 'tgi' .* already means the base model"):
        asyncio.run(serve(config, asyncio.Event()))


def test_a_preloaded_relative_path_is_registered_as_this_shards_absolute_path(
    tiny_model_dir, redis_url, namespace, tmp_path, monkeypatch
):
    """The registry's source is read by every process: a relative path would name a different place
    (or none) for each of them, and the router refuses one in Create."""
    write_peft_adapter(tmp_path / "adapters" / "support", tiny_model_dir, seed=1)
    monkeypatch.chdir(tmp_path)
    config = shard_config(
        tiny_model_dir, redis_url, namespace, tmp_path, preload=(("support", "adapters/support"),)
    )

    async def scenario() -> str:
        registry = Registry(redis_url, namespace)
        try:
            async with running_shard(config):
                return (await registry.get_adapter("support")).source
        finally:
            await registry.close()

    assert asyncio.run(scenario()) == str(tmp_path / "adapters" / "support")


def test_a_taken_port_fails_the_start_before_the_model_loads(tmp_path, namespace, redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = shard_config(tmp_path / "no-model-here", redis_url, namespace, tmp_path, port=port)
        with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{port}"):
            asyncio.run(serve(config, asyncio.Event()))


def test_a_taken_metrics_port_fails_the_start_and_stops_the_engine(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    threads_before = engine_threads()
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = shard_config(tiny_model_dir, redis_url, namespace, tmp_path, metrics_port=port)
        with pytest.raises(OSError, match=f"cannot serve metrics on .*:{port}"):
            asyncio.run(serve(config, asyncio.Event()))
    assert engine_threads() == threads_before, "the engine started for the shard was left running"


def test_a_shard_started_without_redis_serves_and_registers_its_preloads_once_redis_is_back(
    tiny_model_dir, restartable_redis, namespace, tmp_path
):
    source = write_peft_adapter(tmp_path / "support", tiny_model_dir, scale=0.3)
    restartable_redis.stop()
    config = shard_config(
        tiny_model_dir, restartable_redis.url, namespace, tmp_path, preload=(("support", str(source)),)
    )

    async def scenario() -> tuple[int, list[str], ShardRecord]:
        async with running_shard(config) as address:
            async with grpc.aio.insecure_channel(address) as channel:
                chunks = [chunk async for chunk in shard_pb2_grpc.ShardStub(channel).Generate(BASE_REQUEST)]
            await asyncio.to_thread(restartable_redis.restart)
            registry = Registry(restartable_redis.url, namespace)
            try:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 5
                record = await wait_for_record(registry, config.shard_id)
                while not record.adapters and loop.time() < deadline:
                    await asyncio.sleep(0.1)
                    record = await wait_for_record(registry, config.shard_id)
                names = [adapter.name for adapter in await registry.list_adapters()]
            finally:
                await registry.close()
        return chunks[-1].usage.completion_tokens, names, record

    completion_tokens, names, record = asyncio.run(scenario())
    assert completion_tokens == 3, "the base model is served while Redis is away"
    assert names == ["support"], "the preloaded adapter is registered once Redis answers"
    assert [(a.name, a.version, a.tier) for a in record.adapters] == [("support", 1, "cpu")]


def test_heartbeats_outlive_an_unexpected_error_and_come_back_after_redis_restarts_empty(
    tiny_model_dir, restartable_redis, namespace, tmp_path, monkeypatch
):
    record_of = shard_server._record
    failures = iter([RuntimeError("a bug while taking the shard's record")] * 3)

    def flaky_record(service, engine):
        failure = next(failures, None)
        if failure is not None:
            raise failure
        return record_of(service, engine)

    monkeypatch.setattr(shard_server, "_record", flaky_record)
    config = shard_config(tiny_model_dir, restartable_redis.url, namespace, tmp_path)

    async def scenario() -> None:
        async with running_shard(config):
            registry = Registry(restartable_redis.url, namespace)
            try:
                await wait_for_record(registry, config.shard_id)
                await asyncio.to_thread(restartable_redis.restart)  # forgets every key
                await wait_for_record(registry, config.shard_id)
            finally:
                await registry.close()

    asyncio.run(scenario())


def long_request(max_new_tokens: int) -> shard_pb2.ShardGenerateRequest:
    request = shard_pb2.ShardGenerateRequest()
    request.CopyFrom(BASE_REQUEST)
    request.request.parameters.max_new_tokens = max_new_tokens
    return request


async def drain_while_generating(config: ShardConfig, max_new_tokens: int) -> tuple[int, str, list]:
    """Stop the shard while one request generates: (completion tokens it reported, how it ended,
    what health checks said during the drain, then how a new Generate called during it ended)."""
    stop = asyncio.Event()
    task = asyncio.create_task(serve(config, stop))
    async with running_shard_channel(config, task) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        call = shard_pb2_grpc.ShardStub(channel).Generate(long_request(max_new_tokens), timeout=60)
        await call.read()  # generating
        stop.set()
        statuses = []
        for _ in range(3):
            await asyncio.sleep(0.05)
            try:
                statuses.append((await health.Check(health_pb2.HealthCheckRequest(), timeout=1)).status)
            except grpc.aio.AioRpcError as error:
                statuses.append(error.code().name)
        try:
            await shard_pb2_grpc.ShardStub(channel).Generate(long_request(1), timeout=5).read()
            statuses.append("a new Generate was taken")
        except grpc.aio.AioRpcError as error:
            statuses.append(f"{error.code().name}: {error.details()}")
        completion_tokens, ending = 0, "OK"
        try:
            while (chunk := await call.read()) is not grpc.aio.EOF:
                completion_tokens = chunk.usage.completion_tokens or completion_tokens
        except grpc.aio.AioRpcError as error:
            ending = f"{error.code().name}: {error.details()}"
    await asyncio.wait_for(task, timeout=30)
    return completion_tokens, ending, statuses


def test_a_draining_shard_reports_not_serving_while_its_requests_finish(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    config = shard_config(tiny_model_dir, redis_url, namespace, tmp_path, drain_timeout_s=20)
    completion_tokens, ending, statuses = asyncio.run(drain_while_generating(config, 300))
    assert (completion_tokens, ending) == (300, "OK")
    assert statuses[:3] == [health_pb2.HealthCheckResponse.NOT_SERVING] * 3
    assert statuses[3] == f"UNAVAILABLE: {DRAINING_MESSAGE}", "a new request is refused while draining"


def test_a_request_outlasting_the_drain_timeout_ends_unavailable(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    config = shard_config(tiny_model_dir, redis_url, namespace, tmp_path, drain_timeout_s=0.5)
    completion_tokens, ending, _ = asyncio.run(drain_while_generating(config, 480))
    assert completion_tokens == 0
    assert ending.startswith("UNAVAILABLE: the shard is shutting down; retry on another shard"), ending
