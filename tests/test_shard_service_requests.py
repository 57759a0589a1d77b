"""A real shard's request path (tiny model, real redis-server, gRPC on loopback): what it refuses and
how, and that one request's cost or end never holds up the others."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import pytest
from test_shard_lifecycle import running_shard, shard_config

from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.shard.sampling_limits import MAX_STOP_STRINGS


def generate_request(max_new_tokens: int, **fields) -> shard_pb2.ShardGenerateRequest:
    parameters = common_pb2.SamplingParameters(max_new_tokens=max_new_tokens, ignore_eos=True)
    for name, value in fields.pop("parameters", {}).items():
        getattr(parameters, name).extend(value)
    fields.setdefault("prompt_token_ids", [5, 6, 7])
    return shard_pb2.ShardGenerateRequest(request=common_pb2.GenerateRequest(parameters=parameters, **fields))


async def status_of(
    stub: shard_pb2_grpc.ShardStub, request: shard_pb2.ShardGenerateRequest
) -> tuple[str, str]:
    """(status code name, details) of a Generate call run to its end."""
    try:
        async for _ in stub.Generate(request, timeout=30):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code().name, error.details()
    return "OK", ""


@pytest.mark.parametrize(
    ("num_stop_strings", "expected"),
    [
        (MAX_STOP_STRINGS, ("OK", "")),
        (
            MAX_STOP_STRINGS + 1,
            ("INVALID_ARGUMENT", f"stop takes at most 16 strings, got {MAX_STOP_STRINGS + 1}"),
        ),
    ],
)
def test_more_stop_strings_than_the_gateway_takes_are_refused_naming_the_limit(
    tiny_model_dir, redis_url, namespace, tmp_path, num_stop_strings, expected
):
    """Each stop string is searched for after every token on the engine thread: a gRPC caller's list of
    300,000 made every other request in the batch 15x slower. The gateway capped the list; gRPC did not."""
    config = shard_config(tiny_model_dir, redis_url, namespace, tmp_path)
    stops = [f"zq{i:07d}" for i in range(num_stop_strings)]

    async def scenario() -> tuple[str, str]:
        async with running_shard(config) as address, grpc.aio.insecure_channel(address) as channel:
            request = generate_request(2, parameters={"stop": stops})
            return await status_of(shard_pb2_grpc.ShardStub(channel), request)

    assert asyncio.run(scenario()) == expected


async def chunk_gaps(call: grpc.aio.UnaryStreamCall, gaps: list[float]) -> None:
    """Note the time between the call's chunks until it ends (read() only: gRPC refuses a call read
    both ways)."""
    last = time.monotonic()
    while await call.read() is not grpc.aio.EOF:
        now = time.monotonic()
        gaps.append(now - last)
        last = now


def test_a_prompt_of_megabytes_is_refused_without_holding_up_other_streams(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    """Tokenizing 3 MB of text takes seconds; on the shard's event loop it held every other stream's
    chunks (and health checks) that long before the prompt was found too long for the context."""
    config = shard_config(tiny_model_dir, redis_url, namespace, tmp_path)
    huge_prompt = "hello world, how are you today? " * 100_000  # ~800,000 tokens, 3.2 MB

    async def scenario() -> tuple[tuple[str, str], float, list[float]]:
        async with running_shard(config) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            streaming = stub.Generate(generate_request(480), timeout=60)
            await streaming.read()  # generating
            gaps: list[float] = []
            reader = asyncio.create_task(chunk_gaps(streaming, gaps))
            while len(gaps) < 2:
                await asyncio.sleep(0.01)
            started = time.monotonic()
            refused = await status_of(stub, generate_request(8, prompt=huge_prompt, prompt_token_ids=[]))
            parse_s = time.monotonic() - started
            await asyncio.sleep(0.1)  # the other stream's next chunk, however late
            streaming.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            return refused, parse_s, gaps

    (code, details), parse_s, gaps = asyncio.run(scenario())
    assert code == "INVALID_ARGUMENT"
    assert details.startswith("the prompt has ") and details.endswith(
        "tokens but this shard's context is 512 tokens; shorten the prompt"
    )
    assert parse_s > 0.5, "the prompt is large enough to take a while to tokenize"
    assert max(gaps) < parse_s / 2, f"the other stream stalled {max(gaps):.2f} s of the {parse_s:.2f} s parse"


async def engine_load_after(stub: shard_pb2_grpc.ShardStub, timeout_s: float) -> tuple[int, int]:
    """(requests, KV blocks) the shard's engine holds once it holds none, or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = await stub.Status(shard_pb2.ShardStatusRequest())
        load = (status.running_requests + status.waiting_requests, status.kv_blocks_used)
        if load == (0, 0) or time.monotonic() > deadline:
            return load
        await asyncio.sleep(0.01)


def test_requests_cancelled_on_a_generate_many_stream_free_their_blocks_and_spare_the_others(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    """One request cancelled by id, then the stream closed under another: each stops in the engine at
    once, while the requests beside them run to their end."""
    config = shard_config(tiny_model_dir, redis_url, namespace, tmp_path)
    outbox: asyncio.Queue[shard_pb2.ShardStreamRequest] = asyncio.Queue()

    async def messages() -> AsyncIterator[shard_pb2.ShardStreamRequest]:
        while True:
            yield await outbox.get()

    def act(**action) -> None:
        outbox.put_nowait(shard_pb2.ShardStreamRequest(actions=[shard_pb2.ShardStreamAction(**action)]))

    async def scenario() -> tuple[dict[int, tuple[int, int]], tuple[int, int]]:
        completed: dict[int, int] = {}  # id -> completion tokens on its last chunk
        async with running_shard(config) as address, grpc.aio.insecure_channel(address) as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            stream = stub.GenerateMany(messages())
            for request_id, max_new_tokens in [(1, 20), (2, 480), (3, 30), (4, 480)]:
                act(id=request_id, start=generate_request(max_new_tokens, request_id=f"r{request_id}"))
            ends: dict[int, tuple[int, int]] = {}  # id -> (status code, completion tokens)
            cancelled = False
            while len(ends) < 2:
                for event in (await stream.read()).events:
                    assert event.id in (1, 2, 3, 4) and event.chunk.request_id in ("", f"r{event.id}")
                    if event.end:
                        ends[event.id] = (event.status_code, completed.pop(event.id, 0))
                    elif event.chunk.finish_reason:
                        completed[event.id] = event.chunk.usage.completion_tokens
                if not cancelled:
                    act(id=2, cancel=True)
                    cancelled = True
            stream.cancel()  # the router went away with request 4 still generating
            # requests 2 and 4 had hundreds of tokens to go, which take seconds
            return ends, await engine_load_after(stub, timeout_s=0.5)

    ends, engine_load = asyncio.run(scenario())
    assert ends == {1: (0, 20), 3: (0, 30)}, "the requests beside the cancelled ones ran to their end"
    assert engine_load == (0, 0), "the cancelled requests are gone from the engine, their blocks free"
