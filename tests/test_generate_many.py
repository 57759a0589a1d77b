"""Shard/GenerateMany, both ends over real gRPC on loopback: the shard's multiplexer
(protos/generate_many.py) behind a stand-in generate function, and the router's ShardStream
(router/shard_stream.py) in front of it. The real shard and router over it are covered in test_mesh."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import time
import weakref
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing, asynccontextmanager, contextmanager

import grpc
import pytest

from loraplex.protos.generate_many import MAX_MESSAGE_BYTES, serve_generate_many
from loraplex.protos.load_report import load_metadata
from loraplex.protos.rpc import ServiceError, create_server
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.router.channels import ShardChannels


class ScriptedShard(shard_pb2_grpc.ShardServicer):
    """Each request's prompt says what to do: "n:K" streams K chunks (echoing the request's id),
    "hold" streams one chunk and waits for `release`, "bad" fails with INVALID_ARGUMENT, "boom"
    raises a plain exception."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.draining = asyncio.Event()
        self.seen: list[tuple[float | None, dict[str, str]]] = []
        self.closed: list[str] = []  # prompts whose generator was closed before finishing
        self.cancels: list[int] = []  # ids of the cancel actions that came in

    async def Generate(self, request, context):
        async for chunk in self._generate(request, context.time_remaining(), ()):
            yield chunk
        context.set_trailing_metadata(load_metadata(7))

    async def GenerateMany(self, requests, context):
        streams = serve_generate_many(
            self._noting_cancels(requests), self._generate, lambda: 7, self.draining
        )
        async with aclosing(streams) as responses:
            async for response in responses:
                yield response

    async def _noting_cancels(self, requests):
        async for message in requests:
            self.cancels.extend(action.id for action in message.actions if action.cancel)
            yield message

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
                    yield common_pb2.GenerateStreamResponse(  # a real shard echoes request_id too
                        text=f"{i}", finish_reason=int(i == count - 1), request_id=request.request.request_id
                    )
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


@asynccontextmanager
async def _shard_and_channels(
    with_many: bool = True,
) -> AsyncIterator[tuple[ScriptedShard, grpc.aio.Server, str, ShardChannels]]:
    """A scripted shard served on loopback and the router's channels to it, both closed afterwards."""
    servicer = ScriptedShard()
    server, address = await _serve(servicer, with_many)
    channels = ShardChannels()
    try:
        yield servicer, server, address, channels
    finally:
        await channels.close()
        await server.stop(None)


def _request(prompt: str, request_id: str = "") -> shard_pb2.ShardGenerateRequest:
    return shard_pb2.ShardGenerateRequest(
        request=common_pb2.GenerateRequest(prompt=prompt, request_id=request_id)
    )


async def _texts(
    channels: ShardChannels, address: str, prompt: str, timeout: float | None = None, request_id: str = ""
):
    call = channels.stream(address).generate(_request(prompt, request_id), timeout, None)
    async with aclosing(call.chunks()) as chunks:
        texts = [chunk.text async for chunk in chunks]
    return texts, call.outstanding_requests


@contextmanager
def unreachable_address() -> Iterator[str]:
    """An address whose connections never complete, as a shard behind a partition that drops
    packets: a listener with a full accept queue, which the kernel answers by dropping SYNs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    fillers = [socket.socket() for _ in range(3)]
    try:
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(address)
        yield f"127.0.0.1:{address[1]}"
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def test_many_requests_share_one_stream_each_getting_its_own_chunks_in_order() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            counts = [1, 5, 3, 8, 2] * 8
            results = await asyncio.gather(*(_texts(channels, address, f"n:{n}", 30.0) for n in counts))
            assert [texts for texts, _ in results] == [[str(i) for i in range(n)] for n in counts]
            assert {load for _, load in results} == {7}  # the load report rides on each request's end
            assert len(channels._streams) == 1
            # the deadline goes with each request, as Generate's call timeout would
            assert all(remaining is not None and 29 < remaining <= 30 for remaining, _ in servicer.seen)

    asyncio.run(scenario())


def test_errors_keep_their_status_and_leave_the_stream_serving() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (_servicer, _server, address, channels):
            with pytest.raises(ServiceError, match="bad prompt") as bad:
                await _texts(channels, address, "bad")
            assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(ServiceError, match="KeyError") as boom:
                await _texts(channels, address, "boom")
            assert boom.value.code == grpc.StatusCode.INTERNAL
            assert (await _texts(channels, address, "n:2"))[0] == ["0", "1"]
            assert len(channels._streams) == 1

    asyncio.run(scenario())


def test_a_caller_that_leaves_cancels_its_request_on_the_shard() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            call = channels.stream(address).generate(_request("hold"), None, None)
            async with aclosing(call.chunks()) as chunks:
                assert (await anext(chunks)).text == "first"
            for _ in range(100):
                if servicer.closed:
                    break
                await asyncio.sleep(0.01)
            assert servicer.closed == ["hold"]

    asyncio.run(scenario())


def test_a_draining_shard_refuses_new_requests_finishes_old_ones_then_ends_the_stream() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
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

    asyncio.run(scenario())


def test_a_shard_gone_mid_request_fails_it_with_unavailable_and_the_next_stream_is_new() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, server, address, channels):
            held = asyncio.ensure_future(_texts(channels, address, "hold"))
            while not servicer.seen:
                await asyncio.sleep(0.01)
            first = channels.stream(address)
            await server.stop(None)
            with pytest.raises(ServiceError, match="stream to shard") as gone:
                await held
            assert gone.value.code == grpc.StatusCode.UNAVAILABLE
            assert first.closed
            restarted, address2 = await _serve(ScriptedShard())
            try:
                assert channels.stream(address2) is not first
                assert (await _texts(channels, address2, "n:1"))[0] == ["0"]
            finally:
                await restarted.stop(None)

    asyncio.run(scenario())


def test_a_shard_without_generate_many_is_called_with_generate() -> None:
    async def scenario() -> None:
        async with _shard_and_channels(with_many=False) as (_servicer, _server, address, channels):
            assert await _texts(channels, address, "n:3", 30.0) == (["0", "1", "2"], 7)
            assert channels.stream(address).unsupported  # later requests go by Generate at once
            assert await _texts(channels, address, "n:2") == (["0", "1"], 7)
            with pytest.raises(ServiceError, match="bad prompt"):
                await _texts(channels, address, "bad")

    asyncio.run(scenario())


def test_a_request_past_its_deadline_ends_with_deadline_exceeded_and_stops_on_the_shard() -> None:
    """As gRPC ends a Generate call at its deadline, whatever the shard is waiting for."""

    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            started = time.monotonic()
            with pytest.raises(ServiceError) as late:
                await asyncio.wait_for(_texts(channels, address, "hold", 0.3), 5)
            assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 2
            assert servicer.closed == ["hold"]
            assert not channels.stream(address)._requests

    asyncio.run(scenario())


def test_a_deadline_already_past_fails_at_once_without_reaching_the_shard() -> None:
    """timeout_s 0 on the stream means no deadline: a spent one must not turn into none."""

    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            for spent in (0.0, -1.0):
                with pytest.raises(ServiceError) as late:
                    await _texts(channels, address, "n:1", spent)
                assert late.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
            assert servicer.seen == []
            assert not channels.stream(address)._requests

    asyncio.run(scenario())


def test_a_call_never_read_sends_nothing_and_leaves_nothing_behind() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            channels.stream(address).generate(_request("n:1"), None, None)  # dropped unread
            assert (await _texts(channels, address, "n:2"))[0] == ["0", "1"]
            assert len(servicer.seen) == 1
            assert not channels.stream(address)._requests

    asyncio.run(scenario())


def test_leaving_once_the_shard_has_ended_the_request_sends_no_cancel() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            call = channels.stream(address).generate(_request("n:3"), None, None)
            async with aclosing(call.chunks()) as chunks:
                async for chunk in chunks:
                    if chunk.finish_reason:
                        break  # the end came with the last chunk: the shard is done with it
            assert (await _texts(channels, address, "n:1"))[0] == ["0"]  # a round trip after it
            assert servicer.cancels == []
            assert not channels.stream(address)._requests

    asyncio.run(scenario())


def test_a_stream_the_shard_ended_is_freed_once_replaced(caplog) -> None:
    """Nothing keeps an ended stream, gRPC's task writing its actions included: left waiting for
    the next action, that task is only destroyed by the garbage collector, with an error logged."""

    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            assert (await _texts(channels, address, "n:1"))[0] == ["0"]
            first = weakref.ref(channels.stream(address))
            servicer.draining.set()
            for _ in range(100):
                if first().closed:
                    break
                await asyncio.sleep(0.01)
            servicer.draining.clear()
            assert (await _texts(channels, address, "n:1"))[0] == ["0"]  # on a new stream
            for _ in range(100):
                gc.collect()
                if first() is None:
                    break
                await asyncio.sleep(0.01)
            assert first() is None

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(scenario())
    assert [record.getMessage() for record in caplog.records] == []


def test_closing_the_channels_fails_requests_in_flight_instead_of_leaving_them_waiting() -> None:
    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            held = asyncio.ensure_future(_texts(channels, address, "hold"))
            while not servicer.seen:
                await asyncio.sleep(0.01)
            await channels.close()
            with pytest.raises(ServiceError) as gone:
                await asyncio.wait_for(held, 5)
            assert gone.value.code == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


def test_a_channel_left_idle_is_closed_but_never_one_with_a_request_in_flight() -> None:
    """Shards that went away (a restarted pod has a new address) must not keep a channel forever."""

    async def scenario() -> None:
        servicers = [ScriptedShard() for _ in range(3)]
        served = [await _serve(servicer) for servicer in servicers]
        (_, idle), (_, holding), (_, later) = served
        channels = ShardChannels(idle_close_s=0.2)
        try:
            assert (await _texts(channels, idle, "n:1"))[0] == ["0"]
            idle_stream = channels.stream(idle)
            held = asyncio.ensure_future(_texts(channels, holding, "hold"))
            while not servicers[1].seen:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.3)
            assert (await _texts(channels, later, "n:1"))[0] == ["0"]  # a request after the idle time
            assert channels.addresses == sorted([holding, later])
            for _ in range(100):
                if idle_stream.closed:
                    break
                await asyncio.sleep(0.01)
            assert idle_stream.closed
            servicers[1].release.set()
            assert (await asyncio.wait_for(held, 5))[0] == ["first", "last"], "in flight: left open"
            assert (await _texts(channels, idle, "n:2"))[0] == ["0", "1"], "reopened on demand"
        finally:
            await channels.close()
            for server, _ in served:
                await server.stop(None)

    asyncio.run(scenario())


def test_requests_too_large_to_share_a_message_go_one_by_one_and_the_stream_stays_up() -> None:
    """gRPC ends a stream that receives a message over 4 MiB, failing every request on it: requests
    that fit one message each must never be batched into one too large (either way), and a request
    too large alone is refused by itself."""

    async def scenario() -> None:
        async with _shard_and_channels() as (servicer, _server, address, channels):
            held = asyncio.ensure_future(_texts(channels, address, "hold"))
            while not servicer.seen:
                await asyncio.sleep(0.01)
            padding = "x" * (MAX_MESSAGE_BYTES // 3)  # the three together are over 4 MiB
            results = await asyncio.gather(
                *(_texts(channels, address, "n:1", 30.0, request_id=padding + str(i)) for i in range(3))
            )
            assert [texts for texts, _ in results] == [["0"]] * 3
            with pytest.raises(ServiceError, match="bytes as sent to a shard") as refused:
                await _texts(channels, address, "n:1", 30.0, request_id="x" * MAX_MESSAGE_BYTES)
            assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
            servicer.release.set()
            assert (await asyncio.wait_for(held, 5))[0] == ["first", "last"]
            assert not channels.stream(address).closed

    asyncio.run(scenario())


def test_a_shard_that_cannot_be_connected_fails_its_requests_within_the_connect_timeout() -> None:
    """Not after gRPC's default 20 s, past most callers' deadlines: failed with UNAVAILABLE, the
    router retries them on another shard while they still have time."""

    async def scenario() -> None:
        channels = ShardChannels(connect_timeout_s=0.5)
        try:
            with unreachable_address() as address:
                started = time.monotonic()
                with pytest.raises(ServiceError) as failed:
                    await asyncio.wait_for(_texts(channels, address, "n:1", 30.0), 10)
                assert failed.value.code == grpc.StatusCode.UNAVAILABLE
                assert time.monotonic() - started < 3
        finally:
            await channels.close()

    asyncio.run(scenario())
