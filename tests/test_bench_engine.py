"""`loraplex bench engine` end to end on the tiny random model: the report's shape, not its numbers."""

from __future__ import annotations

import json
from pathlib import Path

from loraplex.tools.bench_engine import BenchConfig, run_bench
from loraplex.tools.bench_report import summary_table

SYSTEM_KEYS = {
    "kind",
    "concurrency",
    "num_requests",
    "num_generated_tokens",
    "wall_s",
    "throughput_tok_s",
    "requests_per_s",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
}


def test_engine_only_run_writes_json_and_png(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = BenchConfig(
        model_dir=tiny_model_dir,
        concurrency=(1, 3),
        num_requests=4,
        max_new_tokens=5,
        output_dir=tmp_path,
        skip_baselines=True,
    )
    result = run_bench(config)

    report = json.loads(result.json_path.read_text())
    assert result.png_path.is_file() and result.png_path.stat().st_size > 0
    assert {"date", "machine", "model", "workload", "systems", "ratios", "target"} <= set(report)
    assert report["date"] in result.json_path.name
    assert report["machine"]["device"] == "cpu" and report["machine"]["torch_threads"] >= 1
    assert list(report["systems"]) == ["engine_c1", "engine_c3", "engine_c3_no_prefix_cache"]
    for system in report["systems"].values():
        assert set(system) == SYSTEM_KEYS
        assert system["throughput_tok_s"] > 0
        assert system["num_generated_tokens"] == 4 * 5  # ignore_eos: every request runs to the limit
        assert 0 < system["ttft_ms"]["p50"] <= system["ttft_ms"]["p99"]
    assert report["workload"]["dtype"] == "float32"  # the engine's, and the baselines' (on CPU)
    assert report["ratios"] == {} and report["target"] is None


def test_baselines_run_on_the_same_prompts_and_give_ratios(tiny_model_dir: Path, tmp_path: Path) -> None:
    config = BenchConfig(
        model_dir=tiny_model_dir,
        concurrency=(2,),
        num_requests=4,
        max_new_tokens=3,
        baseline_requests=1,
        static_batch_size=2,
        output_dir=tmp_path,
        compare_prefix_caching=False,
    )
    report = run_bench(config).report

    systems = report["systems"]
    assert list(systems) == ["engine_c2", "hf_sequential", "hf_static_2"]
    assert systems["hf_sequential"]["num_generated_tokens"] == 1 * 3
    assert systems["hf_static_2"]["num_generated_tokens"] == 4 * 3
    assert set(report["ratios"]) == {"engine_c2/hf_sequential", "engine_c2/hf_static_2"}
    assert report["target"]["ratio"] == "engine_c2/hf_static_2"
    assert "hf_static_2" in summary_table(report)
