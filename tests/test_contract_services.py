"""The public gRPC contract as a client (grpcurl, a generated stub) meets it: health names per service,
and errors a Python client can read. Real redis-server, the router's own serve(), a tiny-model shard."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_router import _with_router_channel
from test_shard_lifecycle import running_shard, shard_config

from loraplex.protos.v1 import jobs_pb2, jobs_pb2_grpc
from loraplex.router.server import RouterConfig, serve
from loraplex.tools.processes import free_port


async def _health(address: str, services: list[str]) -> dict[str, str]:
    """Each service name's Health/Check answer: its status, or the error code's name."""
    answers = {}
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in services:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
                answers[service] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                answers[service] = error.code().name
    return answers


def test_every_service_answers_health_by_its_own_name_and_an_unknown_one_is_not_found(
    redis_url, namespace, tiny_model_dir, tmp_path
):
    """grpc.health.v1: the server ("") and each of its services SERVING, any other name NOT_FOUND
    (already right; guards what probes and grpcurl users rely on)."""

    async def scenario() -> tuple[dict[str, str], dict[str, str]]:
        port = free_port()
        stop = asyncio.Event()
        config = RouterConfig(redis_url, "m", port=port, namespace=namespace, refresh_interval_s=60)
        router = asyncio.create_task(serve(config, stop))
        try:
            async with running_shard(shard_config(tiny_model_dir, redis_url, namespace, tmp_path)) as shard:
                router_names = ["", "loraplex.v1.Generation", "loraplex.v1.Adapters", "loraplex.v1.Jobs"]
                return (
                    await _health(f"127.0.0.1:{port}", [*router_names, "loraplex.v1.Shard"]),
                    await _health(shard, ["", "loraplex.v1.Shard", "loraplex.v1.Generation"]),
                )
        finally:
            stop.set()
            await router

    on_router, on_shard = asyncio.run(scenario())
    assert on_router == {
        "": "SERVING",
        "loraplex.v1.Generation": "SERVING",
        "loraplex.v1.Adapters": "SERVING",
        "loraplex.v1.Jobs": "SERVING",
        "loraplex.v1.Shard": "NOT_FOUND",
    }
    assert on_shard == {"": "SERVING", "loraplex.v1.Shard": "SERVING", "loraplex.v1.Generation": "NOT_FOUND"}


def test_a_job_id_too_long_to_quote_is_not_found_not_a_transport_error(redis_url, namespace):
    """Jobs/Get quoted the id whole: a 20,000-character one made a status message past what a client
    takes in metadata (16 KiB), which grpcio reported as RESOURCE_EXHAUSTED "Stream removed"."""

    async def scenario(channel: grpc.aio.Channel) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await jobs_pb2_grpc.JobsStub(channel).Get(jobs_pb2.GetJobRequest(job_id="j" * 20_000), timeout=10)
        return refused.value

    error = asyncio.run(_with_router_channel(redis_url, namespace, scenario))
    assert error.code() == grpc.StatusCode.NOT_FOUND, error.details()
    assert "unknown or expired" in error.details() and "20000 characters" in error.details()
