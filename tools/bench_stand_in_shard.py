"""A stand-in shard for `loraplex bench router`: answers every Generate at once with the same few
prebuilt chunks, so a benchmark through it measures the router, not a model.

Run as its own process (`python -m loraplex.tools.bench_stand_in_shard ID ADDRESS REDIS_URL NAMESPACE
NUM_CHUNKS`); it heartbeats into the registry like a real shard until SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing

import grpc

from loraplex.protos.generate_many import serve_generate_many
from loraplex.protos.load_report import load_metadata
from loraplex.protos.rpc import create_server, run_server, set_serving, stop_on_signals
from loraplex.protos.telemetry import Metadata
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.registry.records import ShardRecord
from loraplex.registry.store import Registry

BASE_MODEL = "bench-stand-in"  # a name only: neither the router nor the stand-in shards load a model
HEARTBEAT_INTERVAL_S = 1.0
HEARTBEAT_TTL_S = 5.0
# Room far beyond any load the bench offers, so the router never answers RESOURCE_EXHAUSTED for it.
MAX_RUNNING_REQUESTS = 1 << 16


class StandInShard(shard_pb2_grpc.ShardServicer):
    """Streams the same num_chunks chunks for every request; the last carries finish_reason and usage.
    Like a real shard it reports its outstanding requests in each call's trailing metadata."""

    def __init__(self, num_chunks: int) -> None:
        if num_chunks < 1:
            raise ValueError(f"num_chunks must be at least 1, got {num_chunks}")
        usage = common_pb2.Usage(prompt_tokens=1, completion_tokens=num_chunks, total_tokens=num_chunks + 1)
        final = common_pb2.GenerateStreamResponse(
            text="tok", finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage
        )
        self._chunks = [common_pb2.GenerateStreamResponse(text="tok ") for _ in range(num_chunks - 1)]
        self._chunks.append(final)
        self._outstanding = 0

    async def Generate(
        self, request: shard_pb2.ShardGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        async for chunk in self._generate(request, None, ()):
            yield chunk
        context.set_trailing_metadata(load_metadata(self._outstanding))

    async def GenerateMany(
        self, requests: AsyncIterator[shard_pb2.ShardStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ShardStreamResponse]:
        """What routers call, through the same multiplexing code as a real shard."""
        streams = serve_generate_many(requests, self._generate, lambda: self._outstanding)
        async with aclosing(streams) as responses:
            async for response in responses:
                yield response

    async def _generate(
        self, request: shard_pb2.ShardGenerateRequest, time_remaining: float | None, metadata: Metadata
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        self._outstanding += 1
        try:
            for chunk in self._chunks:
                yield chunk
        finally:
            self._outstanding -= 1


async def serve_stand_in_shard(
    shard_id: str, address: str, redis_url: str, namespace: str, num_chunks: int
) -> None:
    """Registered before it reports SERVING, so a router started after that sees it at once."""
    stop = stop_on_signals()
    registry = Registry(redis_url, namespace)
    server, _, health = create_server(address, [])
    shard_pb2_grpc.add_ShardServicer_to_server(StandInShard(num_chunks), server)
    await server.start()
    record = ShardRecord(
        shard_id, address, BASE_MODEL, max_context=2048, max_running_requests=MAX_RUNNING_REQUESTS
    )
    await registry.heartbeat(record, ttl_s=HEARTBEAT_TTL_S)
    await set_serving(health, [])
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=HEARTBEAT_INTERVAL_S)
        await registry.heartbeat(record, ttl_s=HEARTBEAT_TTL_S)
    await registry.remove_shard(shard_id)
    await server.stop(None)
    await registry.close()


def stand_in_command(
    shard_id: str, address: str, redis_url: str, namespace: str, num_chunks: int
) -> list[str]:
    """The command line that runs one stand-in shard."""
    module = [sys.executable, "-m", "loraplex.tools.bench_stand_in_shard"]
    return [*module, shard_id, address, redis_url, namespace, str(num_chunks)]


def main(argv: Sequence[str]) -> int:
    shard_id, address, redis_url, namespace, num_chunks = argv
    run_server(serve_stand_in_shard(shard_id, address, redis_url, namespace, int(num_chunks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
