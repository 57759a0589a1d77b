"""`loraplex bench router` end to end with tiny numbers: real redis, stand-in shard and router
processes, one client process. A smoke test of the harness and the report's shape, not a timing test."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from loraplex.protos.load_report import outstanding_requests
from loraplex.protos.v1 import common_pb2, shard_pb2
from loraplex.tools.bench_router import RouterBenchConfig, run_router_bench
from loraplex.tools.bench_router_report import summary_table
from loraplex.tools.bench_stand_in_shard import StandInShard


@pytest.fixture(scope="module")
def result(redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    config = RouterBenchConfig(
        num_shards=2,
        num_latency_requests=50,
        num_warmup_requests=5,
        concurrency=8,
        num_client_processes=1,
        throughput_warmup_s=0.2,
        throughput_duration_s=1.0,
        redis_url=redis_url,
        output_dir=tmp_path_factory.mktemp("bench-router"),
    )
    return run_router_bench(config)


def test_report_has_latency_and_throughput_for_both_paths(result) -> None:
    report = result.report
    assert report["benchmark"] == "router"
    latency = report["latency"]
    for path in ("direct_ms", "routed_ms"):
        assert 0 < latency[path]["p50"] <= latency[path]["p99"]
    assert set(latency["added_ms"]) == {"p50", "p99", "mean"}
    throughput = report["throughput"]
    for target in ("direct", "routed"):
        run = throughput[target]
        assert run["streams_per_s"] > 0 and run["num_streams"] > 0
        assert run["errors"] == {}
        assert run["client_processes"] == 1 and run["concurrency"] == 8
    assert throughput["routed"]["cpu_s"]["router"] > 0, "the router's CPU time over the routed run"
    assert throughput["routed/direct"] > 0


def test_targets_are_checked_and_tabled(result) -> None:
    targets = result.report["targets"]
    assert {"added_p50_ms", "routed_streams_per_s", "met"} <= set(targets)
    assert targets["met"] == (targets["added_p50_ms"]["met"] and targets["routed_streams_per_s"]["met"])
    table = summary_table(result.report)
    assert "added_p50_ms <= 1.0" in table and "routed_streams_per_s >= 2000" in table


def test_write_produces_json_and_png(result) -> None:
    json_path, png_path = Path(result.json_path), Path(result.png_path)
    assert json_path.name.startswith("router-cpu-") and json_path.suffix == ".json"
    assert json.loads(json_path.read_text())["latency"] == result.report["latency"]
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _TrailingMetadata:
    """The one part of a servicer context the stand-in shard uses."""

    metadata = None

    def set_trailing_metadata(self, metadata) -> None:
        self.metadata = metadata


def test_stand_in_shard_streams_the_asked_number_of_chunks_then_finishes() -> None:
    context = _TrailingMetadata()

    async def collect() -> list:
        request = shard_pb2.ShardGenerateRequest(request=common_pb2.GenerateRequest(prompt="hi"))
        return [chunk async for chunk in StandInShard(3).Generate(request, context)]

    chunks = asyncio.run(collect())
    assert [bool(chunk.finish_reason) for chunk in chunks] == [False, False, True]
    assert chunks[-1].usage.completion_tokens == 3
    assert outstanding_requests(context.metadata) == 0  # like a shard, it reports its other calls
    with pytest.raises(ValueError):
        StandInShard(0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_latency_requests", 0),  # the report's added latency needs both paths' percentiles
        ("concurrency", 0),
        ("num_client_processes", 0),
        ("throughput_duration_s", 0.0),  # streams/s over a window of no length
        ("throughput_warmup_s", -1.0),
    ],
)
def test_settings_the_report_cannot_be_built_from_are_refused_before_anything_starts(
    field: str, value: float
) -> None:
    with pytest.raises(ValueError, match="must be"):
        RouterBenchConfig(**{field: value})
