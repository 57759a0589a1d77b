"""`loraplex bench tp` end to end with tiny numbers on the tiny model: a smoke test of the harness and
the report's shape, not a timing test."""

from __future__ import annotations

import json

from loraplex.tools.bench_tp import TPBenchConfig, run_tp_bench, summary_table


def test_report_compares_tp2_with_tp1_on_memory_tokens_and_speed(tiny_model_dir, tmp_path):
    config = TPBenchConfig(
        model_dir=tiny_model_dir,
        tp_sizes=(2,),
        batch_size=4,
        num_adapters=2,
        adapter_rank=8,
        prompt_tokens=8,
        max_new_tokens=4,
        rounds=2,
        kv_cache_bytes=8 << 20,
        output_dir=tmp_path,
    )
    report, json_path, png_path = run_tp_bench(config)
    assert json.loads(json_path.read_text()) == report
    assert png_path.stat().st_size > 0
    (run,) = report["sizes"]
    assert run["tp"] == 2 and run["tokens_match_tp1"] is True
    assert len(run["weight_bytes_per_rank"]) == 2
    assert all(0.45 < fraction < 0.55 for fraction in run["weight_fraction_of_tp1_per_rank"])
    assert len(run["seconds_tp1"]) == len(run["seconds_tp"]) == 2
    assert run["throughput_ratio_vs_tp1"] > 0
    table = summary_table(report).splitlines()
    assert "same tokens" in table[0]
    assert float(table[1].split()[3]) == round(run["tokens_per_s_tp1"], 1), "TP=1's own speed is in its row"


def test_a_size_of_1_is_timed_as_its_own_engine_not_merged_into_the_baseline(tiny_model_dir, tmp_path):
    """`--tp-sizes 1,2`: the size-1 row compares a second TP=1 engine with the baseline (a noise floor);
    each keeps its own rounds."""
    config = TPBenchConfig(
        model_dir=tiny_model_dir,
        tp_sizes=(1,),
        batch_size=2,
        num_adapters=1,
        adapter_rank=4,
        prompt_tokens=4,
        max_new_tokens=2,
        rounds=2,
        kv_cache_bytes=8 << 20,
        output_dir=tmp_path,
    )
    report, _, _ = run_tp_bench(config)
    (run,) = report["sizes"]
    assert len(run["seconds_tp1"]) == len(run["seconds_tp"]) == 2, run
    assert run["tokens_match_tp1"] is True
