"""`loraplex bench serve` end to end on the tiny random model, against a running mesh and a private one
(real redis-server, shard and router processes): every request served by the adapter it named, the
report's shape and accounting. Not a timing test."""

from __future__ import annotations

import json
import math
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2, generation_pb2_grpc
from loraplex.tools.bench_serve import PrivateMesh, ServeBenchConfig, run_serve_bench
from loraplex.tools.bench_serve_report import summary_table
from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.processes import free_port
from loraplex.tools.synthetic_adapters import write_peft_adapter
from loraplex.tools.workload import WorkloadSpec

WORKLOAD = WorkloadSpec(num_requests=12, input_len=12, output_len=4, len_spread=0.5, mix="uniform")


@pytest.fixture(scope="module")
def running_mesh(tiny_model_dir: Path, redis_url: str, tmp_path_factory: pytest.TempPathFactory):
    """A mesh started outside the bench, with three adapters registered (router metrics on)."""
    workdir = tmp_path_factory.mktemp("bench-serve-mesh")
    metrics_port = free_port()
    mesh = start_mesh(
        tiny_model_dir,
        redis_url,
        f"bench-serve-{uuid.uuid4().hex[:8]}",
        workdir,
        num_shards=1,
        router_args=("--metrics-port", str(metrics_port)),
    )
    mesh.router_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    try:
        with grpc.insecure_channel(mesh.router) as channel:
            adapters = adapters_pb2_grpc.AdaptersStub(channel)
            for index, rank in enumerate((4, 8, 16)):
                source = write_peft_adapter(workdir / f"a{index}", tiny_model_dir, rank=rank, seed=index)
                adapters.Create(adapters_pb2.CreateAdapterRequest(name=f"a{index}", source=str(source)))
        yield mesh
    finally:
        mesh.stop()


@pytest.fixture(scope="module")
def result(running_mesh, tmp_path_factory: pytest.TempPathFactory):
    config = ServeBenchConfig(
        workload=WORKLOAD,
        rates=(40.0, math.inf),
        router=running_mesh.router,
        output_dir=tmp_path_factory.mktemp("bench-serve"),
    )
    return run_serve_bench(config)


def test_every_request_completes_on_the_adapter_it_named(result) -> None:
    runs = result.report["runs"]
    assert [(run["rate"], run["system"]) for run in runs] == [
        (40.0, "adapters"),
        (40.0, "base"),
        ("inf", "base"),  # the order alternates from rate to rate
        ("inf", "adapters"),
    ]
    for run in runs:
        assert run["completed"] == run["num_requests"] == 12
        assert run["errors"] == {} and run["wrong_adapter"] == 0
        assert run["output_tok_s"] > 0 and run["requests_per_s"] > 0
        assert 0 < run["ttft_ms"]["p50"] <= run["ttft_ms"]["p99"]
        assert 0 <= run["slo_attainment"] <= 1
        assert run["prompt_tokens_mean"] >= 6  # 12 words +- 50%, a token each
    assert result.report["setup"]["workload"]["num_adapters"] == 3, "every registered adapter"


def test_ratios_pair_the_runs_of_each_rate_and_the_files_are_written(result) -> None:
    report = result.report
    assert set(report["adapters/base"]) == {"40.0", "inf"}
    for ratio in report["adapters/base"].values():
        assert ratio["output_tok_s"] > 0 and ratio["ttft_p50"] > 0
    assert json.loads(result.json_path.read_text()) == report
    assert result.json_path.name.startswith("serve-mesh-"), "a running mesh's shards may run anywhere"
    assert result.png_path.stat().st_size > 10_000
    table = summary_table(report)
    assert "| inf | adapters | 12/12 |" in table and "rate 40.0: adapters/base" in table


def test_an_unknown_adapter_stops_the_bench_at_warm_up_with_its_name(running_mesh, tmp_path: Path) -> None:
    config = ServeBenchConfig(
        workload=WORKLOAD, router=running_mesh.router, adapter_names=("a0", "nope"), output_dir=tmp_path
    )
    with pytest.raises(RuntimeError, match="warm-up request for 'nope' failed with NOT_FOUND"):
        run_serve_bench(config)


def _routed_requests(metrics_url: str) -> float:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        families = text_string_to_metric_families(response.read().decode())
        return sum(
            sample.value
            for family in families
            for sample in family.samples
            if sample.name == "loraplex_router_requests_total"
        )


def test_direct_to_a_shard_bypasses_the_router_with_the_adapters_records(
    running_mesh, tmp_path: Path
) -> None:
    with grpc.insecure_channel(running_mesh.router) as channel:  # one routed call: the counter exists
        request = common_pb2.GenerateRequest(
            prompt="hi", parameters=common_pb2.SamplingParameters(max_new_tokens=1)
        )
        generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=30)
    routed_before = _routed_requests(running_mesh.router_metrics)
    assert routed_before >= 1
    shard = next(iter(running_mesh.shards.values()))
    config = ServeBenchConfig(
        workload=WORKLOAD, rates=(math.inf,), router=running_mesh.router, shard=shard, output_dir=tmp_path
    )
    result = run_serve_bench(config)
    assert result.report["setup"]["path"] == "shard" and result.report["setup"]["shard"] == shard
    assert result.json_path.name.startswith("serve-mesh-") and result.json_path.stem.endswith("-direct")
    for run in result.report["runs"]:
        assert run["completed"] == 12 and run["wrong_adapter"] == 0 and run["errors"] == {}
    assert _routed_requests(running_mesh.router_metrics) == routed_before, "no request took the router"


def test_a_shard_address_without_its_router_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = ServeBenchConfig(
        workload=WORKLOAD, private_mesh=PrivateMesh(tiny_model_dir), shard="127.0.0.1:1", output_dir=tmp_path
    )
    with pytest.raises(ValueError, match="needs its mesh's router"):
        run_serve_bench(config)


def test_a_private_mesh_registers_its_own_adapters(
    tiny_model_dir: Path, redis_url: str, tmp_path: Path
) -> None:
    config = ServeBenchConfig(
        workload=WorkloadSpec(num_requests=6, input_len=8, output_len=3, mix="distinct", num_adapters=3),
        rates=(math.inf,),
        private_mesh=PrivateMesh(tiny_model_dir, ranks=(4, 8), redis_url=redis_url),
        direct=True,  # straight to its shard: the adapters it registered reach the shard as records
        output_dir=tmp_path,
    )
    report = json.loads(run_serve_bench(config).json_path.read_text())
    assert report["setup"]["target"] == "private mesh" and report["setup"]["path"] == "shard"
    assert report["setup"]["private_mesh"]["ranks"] == [4, 8]
    assert report["setup"]["workload"]["num_adapters"] == 3
    for run in report["runs"]:
        assert run["completed"] == 6 and run["wrong_adapter"] == 0 and run["errors"] == {}
