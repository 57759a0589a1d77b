"""Shard/GenerateMany, both ends over real gRPC on loopback: the shard's multiplexer
(protos/generate_many.py) behind a stand-in generate function, and the router's ShardStream
(router/shard_stream.py) in front of it. The real shard and router over it are covered in test_mesh."""

from __future__ import annotations

import asyncio
from contextlib import aclosing

import grpc
import pytest

from loraplex.protos.generate_many import serve_generate_many
from loraplex.protos.load_report import load_metadata
from loraplex.protos.rpc import ServiceError, create_server
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.router.channels import ShardChannels


class ScriptedShard(shard_pb2_grpc.ShardServicer):
    """Each request's prompt says what to do: "n:K" streams K chunks, "hold" streams one chunk and
    waits for `release`, "bad" fails with INVALID_ARGUMENT, "boom" raises a plain exception."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.draining = asyncio.Event()
        self.seen: list[tuple[float | None, dict[str, str]]] = []
        self.closed: list[str] = []  # prompts whose generator was closed before finishing

    async def Generate(self, request, context):
        async for chunk in self._generate(request, context.time_remaining(), ()):
            yield chunk
        context.set_trailing_metadata(load_metadata(7))

    async def GenerateMany(self, requests, context):
        streams = serve_generate_many(requests, self._generate, lambda: 7, self.draining)
        async with aclosing(streams) as responses:
            async for response in responses:
                yield response

    async def _generate(self, request, time_remaining, metadata):
        prompt = request.request.prompt
        self.seen.append((time_remaining, dict(metadata)))
        finished = False
        try:
            if prompt == "bad":
                raise ServiceError.invalid("bad prompt: say something else")
            if prompt == "boom":
                raise KeyError("boom")
            if prompt == "hold":
                yield common_pb2.GenerateStreamResponse(text="first")
                await self.release.wait()
                yield common_pb2.GenerateStreamResponse(text="last", finish_reason=1)
            else:
                count = int(prompt.removeprefix("n:"))
                for i in range(count):
                    await asyncio.sleep(0)  # interleave with the other requests on the stream
                    yield common_pb2.GenerateStreamResponse(text=f"{i}", finish_reason=int(i == count - 1))
            finished = True
        finally:
            if not finished:
                self.closed.append(prompt)


async def _serve(servicer: ScriptedShard, with_many: bool = True) -> tuple[grpc.aio.Server, str]:
    server, port, _ = create_server("127.0.0.1:0", [])
    if with_many:
        shard_pb2_grpc.add_ShardServicer_to_server(servicer, server)
    else:  # an older shard: Generate only, GenerateMany answers UNIMPLEMENTED
        generate = grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=shard_pb2.ShardGenerateRequest.FromString,
            response_serializer=common_pb2.GenerateStreamResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("loraplex.v1.Shard", {"Generate": generate})]
        )
    await server.start()
    return server, f"127.0.0.1:{port}"


def _request(prompt: str) -> shard_pb2.ShardGenerateRequest:
    return shard_pb2.ShardGenerateRequest(request=common_pb2.GenerateRequest(prompt=prompt))


async def _texts(channels: ShardChannels, address: str, prompt: str, timeout: float | None = None):
    call = channels.stream(address).generate(_request(prompt), timeout, None)
    async with aclosing(call.chunks()) as chunks:
        texts = [chunk.text async for chunk in chunks]
    return texts, call.outstanding_requests


def test_many_requests_share_one_stream_each_getting_its_own_chunks_in_order() -> None:
    async def scenario() -> None:
        servicer = ScriptedShard()
        server, address = await _serve(servicer)
        channels = ShardChannels()
        try:
            counts = [1, 5, 3, 8, 2] * 8
            results = await asyncio.gather(*(_texts(channels, address, f"n:{n}", 30.0) for n in counts))
            assert [texts for texts, _ in results] == [[str(i) for i in range(n)] for n in counts]
            assert {load for _, load in results} == {7}  # the load report rides on each request's end
            assert len(channels._streams) == 1
            # the deadline goes with each request, as Generate's call timeout would
            assert all(remaining is not None and 29 < remaining <= 30 for remaining, _ in servicer.seen)
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_errors_keep_their_status_and_leave_the_stream_serving() -> None:
    async def scenario() -> None:
        server, address = await _serve(ScriptedShard())
        channels = ShardChannels()
        try:
            with pytest.raises(ServiceError, match="bad prompt") as bad:
                await _texts(channels, address, "bad")
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(ServiceError, match="KeyError") as boom:
                await _texts(channels, address, "boom")
            assert boom.value.code == grpc.StatusCode.INTERNAL
            assert (await _texts(channels, address, "n:2"))[0] == ["0", "1"]
            assert len(channels._streams) == 1
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_caller_that_leaves_cancels_its_request_on_the_shard() -> None:
    async def scenario() -> None:
        servicer = ScriptedShard()
        server, address = await _serve(servicer)
        channels = ShardChannels()
        try:
            call = channels.stream(address).generate(_request("hold"), None, None)
            async with aclosing(call.chunks()) as chunks:
                assert (await anext(chunks)).text == "first"
            for _ in range(100):
                if servicer.closed:
                    break
                await asyncio.sleep(0.01)
            assert servicer.closed == ["hold"]
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_draining_shard_refuses_new_requests_finishes_old_ones_then_ends_the_stream() -> None:
    async def scenario() -> None:
        servicer = ScriptedShard()
        server, address = await _serve(servicer)
        channels = ShardChannels()
        try:
            held = asyncio.ensure_future(_texts(channels, address, "hold"))
            while not servicer.seen:
                await asyncio.sleep(0.01)
            servicer.draining.set()
            with pytest.raises(ServiceError, match="draining") as refused:
                await _texts(channels, address, "n:1")
            assert refused.value.code == grpc.StatusCode.UNAVAILABLE  # the router retries elsewhere
            servicer.release.set()
            assert (await held)[0] == ["first", "last"]
            stream = channels.stream(address)
            for _ in range(100):
                if stream.closed:
                    break
                await asyncio.sleep(0.01)
            assert stream.closed
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_shard_gone_mid_request_fails_it_with_unavailable_and_the_next_stream_is_new() -> None:
    async def scenario() -> None:
        servicer = ScriptedShard()
        server, address = await _serve(servicer)
        channels = ShardChannels()
        try:
            held = asyncio.ensure_future(_texts(channels, address, "hold"))
            while not servicer.seen:
                await asyncio.sleep(0.01)
            first = channels.stream(address)
            await server.stop(None)
            with pytest.raises(ServiceError, match="stream to shard") as gone:
                await held
            assert gone.value.code == grpc.StatusCode.UNAVAILABLE
            assert first.closed
            server, address2 = await _serve(ScriptedShard())
            assert channels.stream(address2) is not first
            assert (await _texts(channels, address2, "n:1"))[0] == ["0"]
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())


def test_a_shard_without_generate_many_is_called_with_generate() -> None:
    async def scenario() -> None:
        server, address = await _serve(ScriptedShard(), with_many=False)
        channels = ShardChannels()
        try:
            assert await _texts(channels, address, "n:3", 30.0) == (["0", "1", "2"], 7)
            assert channels.stream(address).unsupported  # later requests go by Generate at once
            assert await _texts(channels, address, "n:2") == (["0", "1"], 7)
            with pytest.raises(ServiceError, match="bad prompt"):
                await _texts(channels, address, "bad")
        finally:
            await channels.close()
            await server.stop(None)

    asyncio.run(scenario())
