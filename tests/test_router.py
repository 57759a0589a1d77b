"""The router's admission and in-flight accounting, against a real redis-server and real gRPC on
loopback. The shards here are stand-ins that hold each stream open until told to finish, so that what
is in flight (and where) is under the test's control; the real shards are covered in test_mesh."""

from __future__ import annotations

import asyncio
from collections import Counter

import grpc
import pytest

from loraplex.protos.generate_many import serve_generate_many
from loraplex.protos.rpc import create_server
from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    shard_pb2_grpc,
)
from loraplex.registry.records import AdapterRecord, ShardRecord
from loraplex.registry.store import Registry
from loraplex.router.server import RouterConfig, serve
from loraplex.tools.processes import free_port


class HeldShard(shard_pb2_grpc.ShardServicer):
    """Answers every request (on the GenerateMany stream routers use) with one final chunk, once
    `release` is set."""

    def __init__(self, shard_id: str) -> None:
        self.shard_id = shard_id
        self.release = asyncio.Event()
        self.calls = 0

    async def GenerateMany(self, requests, context):
        async for response in serve_generate_many(requests, self._generate):
            yield response

    async def _generate(self, request, time_remaining, metadata):
        self.calls += 1
        await self.release.wait()
        yield common_pb2.GenerateStreamResponse(text="ok", finish_reason=common_pb2.FINISH_REASON_LENGTH)


class StoppedShard(shard_pb2_grpc.ShardServicer):
    """Holds every request until its server stops: the prompt "chunk" gets one chunk first."""

    def __init__(self) -> None:
        self.draining = asyncio.Event()
        self.calls = 0

    async def GenerateMany(self, requests, context):
        async for response in serve_generate_many(requests, self._generate, draining=self.draining):
            yield response

    async def _generate(self, request, time_remaining, metadata):
        self.calls += 1
        if request.request.prompt == "chunk":
            yield common_pb2.GenerateStreamResponse(text="partial")
        await asyncio.Event().wait()


async def _start_shard(
    registry: Registry, shard_id: str, servicer: shard_pb2_grpc.ShardServicer | None = None, **load: int
) -> tuple[HeldShard, grpc.aio.Server]:
    servicer = servicer or HeldShard(shard_id)
    server, port, _ = create_server("127.0.0.1:0", [])
    shard_pb2_grpc.add_ShardServicer_to_server(servicer, server)
    await server.start()
    record = ShardRecord(shard_id, f"127.0.0.1:{port}", "m", max_context=2048, **load)
    await registry.heartbeat(record, ttl_s=60)  # one report for the whole test: loads stay as written
    return servicer, server


async def _with_router_channel(redis_url: str, namespace: str, scenario, **options):
    """scenario(channel) against a router, and what it returns; options are RouterConfig fields."""
    port = free_port()
    stop = asyncio.Event()
    config = RouterConfig(redis_url, "m", port=port, namespace=namespace, refresh_interval_s=60, **options)
    router = asyncio.create_task(serve(config, stop))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await channel.channel_ready()
            return await scenario(channel)
    finally:
        stop.set()
        await router


async def _with_router(redis_url: str, namespace: str, scenario, **options) -> None:
    """Run scenario(generation stub) against a router; options are RouterConfig fields."""

    async def with_stub(channel: grpc.aio.Channel) -> None:
        await scenario(generation_pb2_grpc.GenerationStub(channel))

    await _with_router_channel(redis_url, namespace, with_stub, **options)


def test_router_counts_its_own_requests_in_flight(redis_url, namespace):
    """The shards' reports say idle and stay so; the router still spreads 6 held requests 3 and 3,
    because it counts what it has sent since the snapshot."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        shards = [await _start_shard(registry, f"s{i}", max_running_requests=8) for i in range(2)]

        async def routed(generation) -> None:
            calls = [
                asyncio.ensure_future(
                    generation.Generate(common_pb2.GenerateRequest(prompt="hi"), timeout=30)
                )
                for _ in range(6)
            ]
            while sum(servicer.calls for servicer, _ in shards) < 6:
                await asyncio.sleep(0.05)
            assert Counter(servicer.calls for servicer, _ in shards) == Counter({3: 2})
            for servicer, _ in shards:
                servicer.release.set()
            assert [reply.text for reply in await asyncio.gather(*calls)] == ["ok"] * 6

        await _with_router(redis_url, namespace, routed)
        for _, server in shards:
            await server.stop(None)
        await registry.close()

    asyncio.run(scenario())


def test_every_shard_saturated_is_resource_exhausted(redis_url, namespace):
    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        shards = [
            await _start_shard(
                registry, f"busy{i}", max_running_requests=4, running_requests=4, waiting_requests=4
            )
            for i in range(2)
        ]

        async def rejected(generation) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generation.Generate(common_pb2.GenerateRequest(prompt="hi"), timeout=30)
            assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "saturated" in raised.value.details() and "retry" in raised.value.details()
            assert sum(servicer.calls for servicer, _ in shards) == 0

        await _with_router(redis_url, namespace, rejected)
        for _, server in shards:
            await server.stop(None)
        await registry.close()

    asyncio.run(scenario())


def test_an_adapter_goes_only_to_shards_whose_rank_limit_holds_it(redis_url, namespace):
    """A rank-16 adapter skips the shard that publishes max_lora_rank 8 (it would refuse the load);
    with only such shards live the caller gets FAILED_PRECONDITION saying what to start."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        small, small_server = await _start_shard(registry, "small", max_running_requests=8, max_lora_rank=8)
        large, large_server = await _start_shard(registry, "large", max_running_requests=8, max_lora_rank=64)
        await registry.create_adapter(
            AdapterRecord("r16", "m", "/adapters/r16", 16, 32.0, ("q_proj",), "sum")
        )
        small.release.set()
        large.release.set()

        async def routed(generation) -> None:
            for _ in range(6):
                reply = await generation.Generate(
                    common_pb2.GenerateRequest(adapter="r16", prompt="hi"), timeout=30
                )
                assert reply.text == "ok"
            assert (small.calls, large.calls) == (0, 6)
            for _ in range(6):  # the base model goes anywhere
                await generation.Generate(common_pb2.GenerateRequest(prompt="hi"), timeout=30)
            assert small.calls > 0

        await _with_router(redis_url, namespace, routed)
        await large_server.stop(None)
        await registry.remove_shard("large")

        async def refused(generation) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await generation.Generate(common_pb2.GenerateRequest(adapter="r16", prompt="hi"), timeout=30)
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "rank 16" in raised.value.details() and "--max-lora-rank" in raised.value.details()

        await _with_router(redis_url, namespace, refused)
        await small_server.stop(None)
        await registry.close()

    asyncio.run(scenario())


def test_a_router_that_never_read_the_catalogue_answers_unavailable_not_not_found(namespace, caplog):
    """Redis unreachable since the router started: it cannot know the adapter, so it must not say the
    adapter does not exist (the gateway would answer 404)."""

    async def routed(generation) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await generation.Generate(common_pb2.GenerateRequest(prompt="hi", adapter="support"), timeout=30)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not yet read the registry" in refused.value.details()

    asyncio.run(_with_router(f"redis://127.0.0.1:{free_port()}/0", namespace, routed))
    # not "the snapshot from 1795560794.2s ago", an age counted from the epoch
    assert "registry unreachable, no snapshot yet" in caplog.text


def test_admin_calls_without_a_name_are_invalid_not_not_found(redis_url, namespace):
    """`Adapters/Get {}` answered NOT_FOUND "adapter '' is not registered"."""
    port = free_port()

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        stop = asyncio.Event()
        router = asyncio.create_task(
            serve(RouterConfig(redis_url, "m", port=port, namespace=namespace), stop)
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await channel.channel_ready()
                admin = adapters_pb2_grpc.AdaptersStub(channel)
                refusals = []
                for call, request in (
                    (admin.Get, adapters_pb2.GetAdapterRequest()),
                    (admin.Delete, adapters_pb2.DeleteAdapterRequest()),
                    (admin.Update, adapters_pb2.UpdateAdapterRequest(source="/nowhere")),
                    (admin.Create, adapters_pb2.CreateAdapterRequest(source="/nowhere")),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call(request, timeout=10)
                    refusals.append((refused.value.code(), refused.value.details()))
                return refusals
        finally:
            stop.set()
            await router

    for code, message in asyncio.run(scenario()):
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "`name` is required" in message


def test_every_live_shard_left_out_after_failures_says_so(redis_url, namespace):
    """The only live shard refuses connections: the first call fails over to nothing, and the next one
    is told the shard is being avoided, not that no shard is registered."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        record = ShardRecord(
            "gone", f"127.0.0.1:{free_port()}", "m", max_context=2048, max_running_requests=8
        )
        await registry.heartbeat(record, ttl_s=60)

        async def routed(generation) -> None:
            request = common_pb2.GenerateRequest(prompt="hi")
            with pytest.raises(grpc.aio.AioRpcError, match="every candidate shard failed"):
                await generation.Generate(request, timeout=30)
            with pytest.raises(grpc.aio.AioRpcError) as avoided:
                await generation.Generate(request, timeout=30)
            assert avoided.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "all 1 live shards are left out" in avoided.value.details()

        try:
            await _with_router(redis_url, namespace, routed)
        finally:
            await registry.close()

    asyncio.run(scenario())


def test_a_shard_stopping_mid_request_retries_only_what_had_not_streamed(redis_url, namespace):
    """The shard's server stops (its drain grace over) with two requests on its stream: the one that
    had streamed a chunk fails with UNAVAILABLE saying so, the other is served by the next shard."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        stopping, stopping_server = await _start_shard(
            registry, "stopping", StoppedShard(), max_running_requests=8
        )
        other, other_server = await _start_shard(
            registry, "other", max_running_requests=8, running_requests=6
        )
        other.release.set()

        async def routed(generation) -> None:
            streamed = generation.GenerateStream(common_pb2.GenerateRequest(prompt="chunk"), timeout=30)
            assert (await streamed.read()).text == "partial"
            waiting = asyncio.ensure_future(
                generation.Generate(common_pb2.GenerateRequest(prompt="wait"), timeout=30)
            )
            while stopping.calls < 2:
                await asyncio.sleep(0.01)
            stopping.draining.set()
            await stopping_server.stop(0.2)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await streamed.read()
            assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "after 1 chunks had streamed" in failed.value.details()
            reply = await waiting
            assert (reply.text, reply.served_by.shard) == ("ok", "other")

        await _with_router(redis_url, namespace, routed)
        await other_server.stop(None)
        await registry.close()

    asyncio.run(scenario())
