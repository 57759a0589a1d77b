"""The /metrics port every server opens (a port it cannot take is a clear error naming the flag), and
what the counters count, against a real router and redis-server."""

from __future__ import annotations

import asyncio
import socket
import time
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from loraplex.protos.metrics import serve_metrics
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc
from loraplex.registry.records import ShardRecord
from loraplex.registry.store import Registry
from loraplex.router.server import RouterConfig
from loraplex.router.server import serve as serve_router
from loraplex.tools.processes import free_port


def test_a_metrics_port_in_use_is_named_with_the_flag_to_change():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=rf"127\.0\.0\.1:{port}.*--metrics-port"):
            serve_metrics(port, CollectorRegistry(), host="127.0.0.1")


def test_port_zero_serves_nothing():
    assert serve_metrics(0, CollectorRegistry()).port == 0


def _scrape(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _sample(port: int, name: str, **labels: str) -> float:
    return _scrape(port).get((name, frozenset(labels.items())), 0.0)


class _Router:
    """A real router (no shard of its own) on a real redis-server, with its metrics port."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.registry = Registry(redis_url, namespace)
        self.config = RouterConfig(
            redis_url,
            "tiny",
            port=self.port,
            namespace=namespace,
            refresh_interval_s=0.1,
            suspect_for_s=0,  # a shard that failed is tried again by the next request
            metrics_port=self.metrics_port,
        )

    async def add_shard(self, name: str, port: int | None = None) -> None:
        """A shard record at 127.0.0.1:port (default: a port nothing listens on), once the router
        sees it."""
        record = ShardRecord(
            name,
            f"127.0.0.1:{port or free_port()}",
            "tiny",
            max_context=2048,
            max_running_requests=8,
            reported_at=time.time(),
        )
        await self.registry.heartbeat(record, ttl_s=60)
        live = len(await self.registry.live_shards())
        for _ in range(200):
            try:
                if _sample(self.metrics_port, "loraplex_router_live_shards") == live:
                    return
            except OSError:  # the router is still starting
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"the router never saw shard {name}")

    async def generate(self, timeout: float) -> grpc.StatusCode:
        request = common_pb2.GenerateRequest(prompt="hi", parameters={"max_new_tokens": 1})
        async with grpc.aio.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout)
        return failed.value.code()


@asynccontextmanager
async def _router(redis_url: str, namespace: str) -> AsyncIterator[_Router]:
    router, stop = _Router(redis_url, namespace), asyncio.Event()
    served = asyncio.create_task(serve_router(router.config, stop))
    try:
        yield router
    finally:
        stop.set()
        await served
        await router.registry.close()


def test_router_counts_a_failover_only_when_another_shard_is_tried(redis_url, namespace):
    """A failed forward is a failover when the request goes on to another shard; the last
    candidate's failure, with none left to try, is not."""

    async def scenario() -> None:
        async with _router(redis_url, namespace) as router:
            await router.add_shard("dead-1")
            assert await router.generate(timeout=10) == grpc.StatusCode.UNAVAILABLE
            failovers = "loraplex_router_failovers_total"
            assert _sample(router.metrics_port, failovers) == 0, "one shard: nothing was retried"
            await router.add_shard("dead-2")
            assert await router.generate(timeout=10) == grpc.StatusCode.UNAVAILABLE
            assert _sample(router.metrics_port, failovers) == 1, "two shards: one retry"
            requests = "loraplex_router_requests_total"
            assert _sample(router.metrics_port, requests, adapter="base", code="UNAVAILABLE") == 2

    asyncio.run(scenario())


def test_router_counts_a_request_its_deadline_ended_as_deadline_exceeded(redis_url, namespace):
    """The code a client got: a shard that never answers (it takes connections but speaks no HTTP/2)
    holds the request until gRPC ends it at the caller's deadline."""

    async def scenario() -> None:
        with socket.socket() as silent:
            silent.bind(("127.0.0.1", 0))
            silent.listen()
            async with _router(redis_url, namespace) as router:
                await router.add_shard("silent", silent.getsockname()[1])
                assert await router.generate(timeout=0.5) == grpc.StatusCode.DEADLINE_EXCEEDED
                await asyncio.sleep(0.2)  # the router's handler ends just after the client's call
                requests = "loraplex_router_requests_total"
                assert _sample(router.metrics_port, requests, adapter="base", code="DEADLINE_EXCEEDED") == 1
                assert _sample(router.metrics_port, requests, adapter="base", code="CANCELLED") == 0

    asyncio.run(scenario())


def test_a_stopped_router_and_shard_free_their_metrics_ports(tiny_model_dir, redis_url, namespace, tmp_path):
    """The /metrics server outlived serve(): in a longer-lived process (tests, benchmarks) the port kept
    answering and could not be taken again."""
    from test_router import _with_router
    from test_shard_lifecycle import running_shard, shard_config

    def answers(port: int) -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", port)) == 0

    router_port, shard_port = free_port(), free_port()

    async def scenario() -> None:
        async def scraped(generation) -> None:
            assert answers(router_port)

        await _with_router(redis_url, namespace, scraped, metrics_port=router_port)
        async with running_shard(
            shard_config(tiny_model_dir, redis_url, namespace, tmp_path, metrics_port=shard_port)
        ):
            assert answers(shard_port)

    asyncio.run(scenario())
    assert not answers(router_port) and not answers(shard_port)
