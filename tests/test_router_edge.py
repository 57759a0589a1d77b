"""The router's request path at its edges, against a real redis-server and stand-in shards on
loopback (test_router's): a shard it cannot connect to, request ids clients share, and what a
handler's bug turns into."""

from __future__ import annotations

import asyncio
import time
import urllib.request

import grpc
import pytest
from test_generate_many import unreachable_address
from test_router import _start_shard, _with_router

from loraplex.protos.generate_many import serve_generate_many
from loraplex.protos.rpc import create_server
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc, shard_pb2_grpc
from loraplex.registry.records import AdapterRecord, HeldAdapter, ShardRecord
from loraplex.registry.store import Registry
from loraplex.router.channels import CONNECT_TIMEOUT_S
from loraplex.tools.processes import free_port


class EchoShard(shard_pb2_grpc.ShardServicer):
    """Streams each request's prompt back a character a chunk, with its request_id (as a real shard
    echoes it), the requests interleaved on the stream."""

    async def GenerateMany(self, requests, context):
        async for response in serve_generate_many(requests, self._generate):
            yield response

    async def _generate(self, request, time_remaining, metadata):
        prompt, request_id = request.request.prompt, request.request.request_id
        for i, char in enumerate(prompt):
            await asyncio.sleep(0)
            finish = common_pb2.FINISH_REASON_LENGTH if i == len(prompt) - 1 else 0
            yield common_pb2.GenerateStreamResponse(text=char, request_id=request_id, finish_reason=finish)


def test_a_live_shard_the_router_cannot_connect_to_is_failed_over_within_the_deadline(redis_url, namespace):
    """The shard heartbeats (so it stays in the ring) but its connections never complete: the request
    goes to the next shard after the connect timeout, well inside a deadline shorter than gRPC's own
    connect timeout (20 s), and the shard is avoided afterwards."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        # one request on "good" makes the cut-off shard the less loaded: it is tried first
        good, good_server = await _start_shard(registry, "good", max_running_requests=8, running_requests=1)
        good.release.set()
        with unreachable_address() as address:
            cut_off = ShardRecord("cut-off", address, "m", max_context=2048, max_running_requests=8)
            await registry.heartbeat(cut_off, ttl_s=60)

            async def routed(generation) -> None:
                request = common_pb2.GenerateRequest(prompt="hi")
                started = time.monotonic()
                reply = await generation.Generate(request, timeout=CONNECT_TIMEOUT_S + 2)
                assert reply.served_by.shard == "good"
                assert time.monotonic() - started > CONNECT_TIMEOUT_S / 2, "the cut-off shard was tried"
                started = time.monotonic()
                reply = await generation.Generate(request, timeout=CONNECT_TIMEOUT_S + 2)
                assert reply.served_by.shard == "good"
                assert time.monotonic() - started < CONNECT_TIMEOUT_S / 2, "and then avoided"

            try:
                await _with_router(redis_url, namespace, routed)
            finally:
                await good_server.stop(None)
                await registry.close()

    asyncio.run(scenario())


def test_clients_sharing_a_request_id_each_get_only_their_own_chunks(redis_url, namespace):
    """request_id is the client's to choose, so two may pick the same one: the router's stream to a
    shard tells its requests apart by ids of its own."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        _, server = await _start_shard(registry, "echo", EchoShard(), max_running_requests=64)

        async def routed(generation) -> None:
            prompts = [f"client {i} says hello" for i in range(20)]
            replies = await asyncio.gather(
                *(
                    generation.Generate(common_pb2.GenerateRequest(prompt=p, request_id="same"), timeout=30)
                    for p in prompts
                )
            )
            assert [(reply.text, reply.request_id) for reply in replies] == [(p, "same") for p in prompts]

        try:
            await _with_router(redis_url, namespace, routed)
        finally:
            await server.stop(None)
            await registry.close()

    asyncio.run(scenario())


class ReportingShard(shard_pb2_grpc.ShardServicer):
    """Reports 0 outstanding requests as each request ends; the prompt "hold" waits for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    async def GenerateMany(self, requests, context):
        async for response in serve_generate_many(requests, self._generate, lambda: 0):
            yield response

    async def _generate(self, request, time_remaining, metadata):
        if request.request.prompt == "hold":
            await self.release.wait()
        yield common_pb2.GenerateStreamResponse(text="ok", finish_reason=common_pb2.FINISH_REASON_LENGTH)


def _gauge(metrics_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return next(float(line.split()[1]) for line in lines if line.startswith(name + " "))


def test_the_inflight_gauge_counts_requests_in_flight_whatever_the_shards_reported(redis_url, namespace):
    """The heartbeat says 6 outstanding, each call's end reports 0: placement corrects the shard's load
    by -6, but the router has 1 request in flight, then none."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        shard, server = await _start_shard(
            registry, "reporting", ReportingShard(), max_running_requests=8, running_requests=6
        )
        metrics_port = free_port()
        gauge = "loraplex_router_inflight_requests"

        async def routed(generation) -> None:
            await generation.Generate(common_pb2.GenerateRequest(prompt="hi"), timeout=30)
            assert await asyncio.to_thread(_gauge, metrics_port, gauge) == 0
            held = asyncio.ensure_future(
                generation.Generate(common_pb2.GenerateRequest(prompt="hold"), timeout=30)
            )
            while await asyncio.to_thread(_gauge, metrics_port, gauge) == 0 and not held.done():
                await asyncio.sleep(0.01)
            assert await asyncio.to_thread(_gauge, metrics_port, gauge) == 1
            shard.release.set()
            await held
            assert await asyncio.to_thread(_gauge, metrics_port, gauge) == 0

        try:
            await _with_router(redis_url, namespace, routed, metrics_port=metrics_port)
        finally:
            await server.stop(None)
            await registry.close()

    asyncio.run(scenario())


class FailingGeneration(generation_pb2_grpc.GenerationServicer):
    """A handler with a bug in it (any exception, not only the few the interceptor once listed)."""

    async def Generate(self, request, context):
        if request.prompt == "abort":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return [][1]

    async def GenerateStream(self, request, context):
        yield common_pb2.GenerateStreamResponse(text="first")
        raise TypeError("a bug after the first chunk")


def test_an_unexpected_exception_in_a_handler_is_internal_with_its_text(caplog):
    """Not gRPC's UNKNOWN "Unexpected <class ...>"; a handler's own abort keeps its status."""

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        server, port, _ = create_server("127.0.0.1:0", [])
        generation_pb2_grpc.add_GenerationServicer_to_server(FailingGeneration(), server)
        await server.start()
        failures = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                generation = generation_pb2_grpc.GenerationStub(channel)
                for prompt in ("", "abort"):
                    with pytest.raises(grpc.aio.AioRpcError) as failed:
                        await generation.Generate(common_pb2.GenerateRequest(prompt=prompt), timeout=10)
                    failures.append((failed.value.code(), failed.value.details()))
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    async for _ in generation.GenerateStream(common_pb2.GenerateRequest(), timeout=10):
                        pass
                failures.append((failed.value.code(), failed.value.details()))
        finally:
            await server.stop(None)
        return failures

    assert asyncio.run(scenario()) == [
        (grpc.StatusCode.INTERNAL, "IndexError: list index out of range"),
        (grpc.StatusCode.NOT_FOUND, "no such thing"),
        (grpc.StatusCode.INTERNAL, "TypeError: a bug after the first chunk"),
    ]
    assert "a bug after the first chunk" in caplog.text  # logged with its traceback


async def _registered_tuned_v2(registry: Registry) -> None:
    record = AdapterRecord("tuned", "m", "/nowhere", 8, 16.0, ("q_proj",), "c")
    await registry.create_adapter(record)
    assert (await registry.update_adapter(record)).version == 2


def test_the_router_asks_placement_for_the_adapters_catalogue_version(redis_url, namespace):
    """After an update, the idle shard still holding v1 on GPU is no holder of v2: the request goes to
    the busier shard holding v2 on disk (one request running: within the bound at any mean)."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        await _registered_tuned_v2(registry)
        started = [
            await _start_shard(
                registry, "stale", max_running_requests=8, adapters=(HeldAdapter("tuned", 1, "gpu"),)
            ),
            await _start_shard(
                registry,
                "fresh",
                max_running_requests=8,
                running_requests=1,
                adapters=(HeldAdapter("tuned", 2, "disk"),),
            ),
        ]
        for shard, _ in started:
            shard.release.set()

        async def routed(generation) -> None:
            reply = await generation.Generate(
                common_pb2.GenerateRequest(prompt="hi", adapter="tuned"), timeout=30
            )
            assert (reply.served_by.shard, reply.served_by.adapter_version) == ("fresh", 2)

        try:
            await _with_router(redis_url, namespace, routed)
        finally:
            for _, server in started:
                await server.stop(None)
            await registry.close()

    asyncio.run(scenario())


@pytest.mark.parametrize(("saturation_factor", "served_by"), [(None, "room"), (3.0, "holder")])
def test_the_router_passes_its_saturation_factor_to_placement(
    redis_url, namespace, saturation_factor, served_by
):
    """The holder has 2x its batch outstanding: saturated under the default --saturation-factor, so the
    shard with room takes the request though its queued tokens weigh more; at 3x the holder keeps it."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        await _registered_tuned_v2(registry)
        held = (HeldAdapter("tuned", 2, "gpu"),)
        started = [
            await _start_shard(
                registry, "holder", max_running_requests=8, running_requests=8, waiting_requests=8,
                queued_tokens=800, adapters=held,
            ),
            await _start_shard(registry, "room", max_running_requests=8, running_requests=6, queued_tokens=12_000),
        ]  # fmt: skip
        for shard, _ in started:
            shard.release.set()
        options = {} if saturation_factor is None else {"saturation_factor": saturation_factor}

        async def routed(generation) -> None:
            reply = await generation.Generate(
                common_pb2.GenerateRequest(prompt="hi", adapter="tuned"), timeout=30
            )
            assert reply.served_by.shard == served_by

        try:
            await _with_router(redis_url, namespace, routed, **options)
        finally:
            for _, server in started:
                await server.stop(None)
            await registry.close()

    asyncio.run(scenario())


def test_a_name_too_long_to_quote_whole_is_not_found_not_a_metadata_error(redis_url, namespace):
    """The NOT_FOUND message quoted a 20,000-character adapter name whole: past the client's 16 KiB of
    metadata, grpcio reported RESOURCE_EXHAUSTED about the metadata instead. Every status message is cut
    to a size that fits."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        await registry.create_adapter(AdapterRecord("known", "m", "/nowhere", 8, 16.0, ("q_proj",), "c"))

        async def routed(generation) -> None:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await generation.Generate(
                    common_pb2.GenerateRequest(prompt="hi", adapter="x" * 20_000), timeout=30
                )
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND, refused.value.details()
            assert "(20000 characters) is not registered" in refused.value.details()

        try:
            await _with_router(redis_url, namespace, routed)
        finally:
            await registry.close()

    asyncio.run(scenario())
