"""What a shard's /metrics adds to vLLM's core set, scraped from a real shard (tiny model): tokens
generated, preemptions and prefix-cache hits; and histogram buckets that hold the mesh's longest
requests."""

from __future__ import annotations

import asyncio
from dataclasses import fields, replace

import grpc
import torch
from prometheus_client import Histogram
from test_metrics import _scrape
from test_shard_lifecycle import running_shard, shard_config

from loraplex.protos.metrics import AdapterLabels
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.router.gateway.app import GatewayConfig
from loraplex.router.gateway.metrics import GatewayMetrics
from loraplex.router.metrics import RouterMetrics
from loraplex.router.worker import WorkerConfig
from loraplex.shard.engine import EngineConfig
from loraplex.shard.model_config import ModelConfig
from loraplex.tools.processes import free_port

BLOCK_SIZE = 16


def test_a_shard_counts_generated_tokens_preemptions_and_prefix_cache_hits(
    tiny_model_dir, redis_url, namespace, tmp_path
):
    """Six requests of 64 tokens each on a KV cache of 24 blocks: they cannot all keep their blocks, so
    some are preempted; the same 3-block prompt six times has its leading blocks cached."""
    metrics_port = free_port()
    bytes_per_block = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(torch.float32) * BLOCK_SIZE
    config = replace(
        shard_config(tiny_model_dir, redis_url, namespace, tmp_path, metrics_port=metrics_port),
        engine=EngineConfig(block_size=BLOCK_SIZE, kv_cache_bytes=24 * bytes_per_block),
    )
    prompt = " ".join(["word"] * (3 * BLOCK_SIZE))
    num_requests, num_tokens = 6, 64

    async def scenario() -> None:
        async with running_shard(config) as address, grpc.aio.insecure_channel(address) as channel:
            shard = shard_pb2_grpc.ShardStub(channel)
            request = shard_pb2.ShardGenerateRequest(
                request=common_pb2.GenerateRequest(
                    prompt=prompt, parameters={"max_new_tokens": num_tokens, "ignore_eos": True}
                )
            )

            async def generate() -> int:
                return len([chunk async for chunk in shard.Generate(request, timeout=60)])

            assert await generate() == num_tokens  # its prompt's blocks are cached from now on
            assert await asyncio.gather(*(generate() for _ in range(num_requests - 1))) == [num_tokens] * 5
            scraped = _scrape(metrics_port)
        tokens = scraped[("loraplex_shard_generation_tokens_total", frozenset({("adapter", "base")}))]
        assert tokens == num_requests * num_tokens
        assert scraped[("loraplex_shard_preemptions_total", frozenset())] > 0
        assert scraped[("loraplex_shard_prefix_cache_hit_tokens_total", frozenset())] >= 5 * 2 * BLOCK_SIZE

    asyncio.run(scenario())


def _counted_in_a_finite_bucket(histogram: Histogram, seconds: float) -> bool:
    """Whether an observation of `seconds` lands under a finite `le` (else histogram_quantile can only
    answer the largest finite bound for it)."""
    histogram.labels("probe").observe(seconds)
    (family,) = histogram.collect()
    return any(
        sample.labels["le"] != "+Inf" and sample.value == 1
        for sample in family.samples
        if sample.name.endswith("_bucket")
        and sample.labels.get("route", sample.labels.get("adapter")) == "probe"
    )


def test_request_latency_histograms_resolve_requests_as_long_as_the_mesh_allows():
    """The gateway and the job worker give a generation 600 s by default: latencies up to that have a
    bucket of their own, as vLLM's e2e histogram reaches 7680 s (shards share the router's buckets)."""
    worker_defaults = {field.name: field.default for field in fields(WorkerConfig)}
    longest = max(GatewayConfig(router="", model="").request_timeout_s, worker_defaults["request_timeout_s"])
    router = RouterMetrics(None, AdapterLabels())  # type: ignore[arg-type]
    gateway = GatewayMetrics()
    for histogram in (router.duration, router.ttft, gateway.duration, gateway.first_byte):
        assert _counted_in_a_finite_bucket(histogram, longest * 0.9), histogram.describe()[0].name
