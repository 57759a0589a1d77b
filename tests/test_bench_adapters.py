"""`loraplex bench adapters` end to end on the tiny random model: the report's shape and its
accounting (tiers, ratios, targets), not its speed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from loraplex.tools.bench_adapters import AdapterBenchConfig, run_adapter_bench, run_peft_baseline
from loraplex.tools.bench_adapters_report import summary_table
from loraplex.tools.bench_engine import baseline_dtype
from loraplex.tools.synthetic_adapters import write_peft_adapter


def test_levels_baseline_and_tiers_are_reported(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = AdapterBenchConfig(
        model_dir=tiny_model_dir,
        adapter_counts=(1, 6),
        num_requests=8,
        rounds=2,
        pairs=2,
        paired_new_tokens=2,
        concurrency=4,
        max_new_tokens=3,
        ranks=(4, 8),
        targets=("q_proj", "v_proj", "down_proj"),
        max_gpu_adapters=2,  # fewer slots and CPU entries than adapters: loads and evictions happen
        max_cpu_adapters=2,
        baseline_adapters=6,
        baseline_requests=2,
        output_dir=tmp_path / "results",
        work_dir=tmp_path / "work",
        kv_cache_bytes=8 << 20,
    )
    result = run_adapter_bench(config)

    report = json.loads(result.json_path.read_text())
    assert result.png_path.is_file() and result.png_path.stat().st_size > 0
    assert result.json_path.name == f"adapters-cpu-{report['date']}.json"
    assert list(report["systems"]) == ["base_only", "adapters_1", "adapters_6", "peft_6"]
    for name, system in report["systems"].items():
        requests = 2 if name == "peft_6" else 8
        assert system["num_generated_tokens"] == requests * 3, (
            name
        )  # ignore_eos: every request runs to the limit
        assert system["throughput_tok_s"] > 0
    one, six = report["systems"]["adapters_1"], report["systems"]["adapters_6"]
    assert one["distinct_adapters_used"] == 1
    # round 1's 4 requests (the concurrency) arrive together and share one load; round 2's 4 are hits
    assert one["cpu"] == {"hits": 4, "misses": 1} and one["disk"] == {"hits": 0, "misses": 1}
    assert 1 < six["distinct_adapters_used"] <= 6
    assert six["cpu"]["misses"] >= six["distinct_adapters_used"]  # cold once each, more after evictions
    assert six["cpu"]["hits"] + six["cpu"]["misses"] <= 8
    assert six["slots"]["hits"] + six["slots"]["misses"] == 8
    loads = report["adapter_load_latency_ms"]
    assert loads["source_to_disk"]["count"] == 1 + six["disk"]["misses"]
    assert loads["disk_to_cpu"]["count"] == 1 + six["cpu"]["misses"]
    assert loads["cpu_to_slot"]["count"] >= 1 + six["distinct_adapters_used"]
    assert all(0 < loads[step]["p50"] <= loads[step]["p99"] for step in ("source_to_disk", "disk_to_cpu"))
    # taking a slot on the torch path is a pointer swap (the packing happened at load): microseconds
    assert 0 <= loads["cpu_to_slot"]["p50"] <= loads["cpu_to_slot"]["p99"] < loads["disk_to_cpu"]["p50"]
    assert set(report["ratios"]) == {
        "adapters_1/base_only",
        "adapters_6/base_only",
        "base_only/peft_6",
        "adapters_1/peft_6",
        "adapters_6/peft_6",
    }
    assert {name: len(values) for name, values in report["ratios_per_round"].items()} == {
        "adapters_1/base_only": 2,
        "adapters_6/base_only": 2,
    }
    workload = report["workload"]
    assert workload["prefix_caching"] is False
    # the run's settings, so that the figures can be reproduced from the JSON alone
    assert workload["seed"] == 0 and workload["zipf_alpha"] == 1.0 and workload["dtype"] == "float32"
    assert (workload["pairs"], workload["paired_new_tokens"]) == (2, 2)
    assert (workload["baseline_adapters"], workload["baseline_requests"]) == (6, 2)
    assert workload["kv_cache_bytes"] == 8 << 20 and report["model_dir"] == str(tiny_model_dir)
    paired = report["paired_batch_ratios"]
    assert set(paired) == {"adapters_1/base_only", "adapters_6/base_only"}
    assert all(len(p["pairs"]) == 2 and p["median"] > 0 for p in paired.values())
    assert [t["ratio"] for t in report["targets"]] == ["adapters_6/base_only", "adapters_6/peft_6"]
    assert "target adapters_6/peft_6" in summary_table(report)
    written = list((tmp_path / "work" / "sources").glob("n6-a*"))
    assert len(written) == six["distinct_adapters_used"]  # adapters no request drew are never written


def test_the_peft_baselines_adapter_switch_is_timed_with_its_request(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Switching adapters per request is the system the baseline stands for: its cost counts, as the
    engine's slot swaps and loads count in the levels' times."""
    switch_s = 0.2
    set_adapter = PeftModel.set_adapter

    def slow_set_adapter(self, *args, **kwargs):
        time.sleep(switch_s)
        return set_adapter(self, *args, **kwargs)

    monkeypatch.setattr(PeftModel, "set_adapter", slow_set_adapter)
    sources = {
        index: write_peft_adapter(tmp_path / f"a{index}", tiny_model_dir, rank=4, seed=index)
        for index in (0, 1)
    }
    config = AdapterBenchConfig(model_dir=tiny_model_dir, max_new_tokens=2, baseline_adapters=2)
    choices = [0, 1, 0]
    run = run_peft_baseline(config, [[1, 2, 3]] * len(choices), choices, sources)

    assert run.num_tokens == 2 * len(choices)
    assert run.wall_s >= len(choices) * switch_s
    assert all(timing.e2e_s >= switch_s and timing.ttft_s >= switch_s for timing in run.timings)


@pytest.mark.parametrize(
    ("device", "dtype"), [("cpu", torch.float32), ("cuda", torch.bfloat16), ("cuda:1", torch.bfloat16)]
)
def test_transformers_baselines_load_the_weights_in_the_engines_dtype(
    device: str, dtype: torch.dtype
) -> None:
    # the engine's "auto": fp32 on CPU, bf16 on GPUs; a baseline in fp32 on a GPU would flatter the engine
    assert baseline_dtype(device) == dtype
