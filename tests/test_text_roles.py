"""Chat messages over gRPC to a real shard (tiny model, real redis-server): a role the contract does not
name is the caller's error, INVALID_ARGUMENT naming the message, as the gateway's 400 is."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.shard.engine import EngineConfig
from loraplex.shard.server import ShardConfig, serve
from loraplex.tools.processes import free_port


async def _wait_serving(channel: grpc.aio.Channel, task: asyncio.Task) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    while True:
        if task.done():
            task.result()  # its start-up error
        try:
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        await asyncio.sleep(0.1)


def _request(*messages: tuple[str, str]) -> shard_pb2.ShardGenerateRequest:
    return shard_pb2.ShardGenerateRequest(
        request=common_pb2.GenerateRequest(
            messages=[common_pb2.ChatMessage(role=role, content=content) for role, content in messages],
            parameters=common_pb2.SamplingParameters(max_new_tokens=2, ignore_eos=True),
        )
    )


def test_an_unknown_chat_role_is_invalid_argument_and_known_ones_are_served(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    config = ShardConfig(
        shard_id="roles",
        model=str(tiny_model_dir),
        cache_dir=tmp_path / "cache",
        redis_url=redis_url,
        port=free_port(),
        namespace=namespace,
        engine=EngineConfig(kv_cache_bytes=16 << 20),
    )

    async def scenario() -> tuple[grpc.aio.AioRpcError, list[common_pb2.GenerateStreamResponse]]:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(config, stop))
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{config.port}") as channel:
                await _wait_serving(channel, task)
                stub = shard_pb2_grpc.ShardStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Generate(_request(("user", "hi"), ("wizard", "abracadabra"))).read()
                served = [c async for c in stub.Generate(_request(("system", "be brief"), ("user", "hi")))]
                return refused.value, served
        finally:
            stop.set()
            await asyncio.wait_for(task, timeout=30)

    refused, served = asyncio.run(scenario())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[1].role" in refused.details() and "'wizard'" in refused.details()
    assert served[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
