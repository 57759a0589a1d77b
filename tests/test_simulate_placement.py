"""The placement simulator on a small cluster: the report's shape, and the orderings that must hold."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from loraplex.tools.simulate_placement import POLICIES, SimConfig, main, run_simulation, simulate
from loraplex.tools.simulate_placement_report import summary_table, write_report

SMALL = SimConfig(
    num_shards=20,
    num_adapters=2_000,
    alphas=(1.0,),
    gpu_slots=16,
    cpu_slots=32,
    max_running_requests=16,
    mean_service_ticks=10,
    warmup_ticks=60,
    measure_ticks=40,
    refresh_ticks=5,
    gpu_slots_sensitivity=(8,),
    workers=1,
)
RUN_KEYS = {
    "gpu_hit_rate",
    "load_imbalance",
    "load_imbalance_p99",
    "served_imbalance",
    "num_requests_measured",
    "hit_rate_timeline",
    "reasons",
    "gpu_copies_of_top_adapter",
    "distinct_adapters_in_gpu",
    "wall_s",
}


@pytest.fixture(scope="module")
def report() -> dict:
    return run_simulation(SMALL)


def test_report_has_every_policy_the_churn_run_and_the_targets(report: dict) -> None:
    assert {"date", "machine", "config", "definitions", "results", "churn", "targets"} <= set(report)
    runs = report["results"]["1.0"]
    assert set(runs) == set(POLICIES)
    for run in runs.values():
        assert set(run) == RUN_KEYS
        assert 0 <= run["gpu_hit_rate"] <= 1 and run["load_imbalance"] >= 1
        assert run["num_requests_measured"] > 0
    assert set(runs["bounded_load"]["reasons"]) <= {"affinity", "home", "spill", "replicate", "overloaded"}
    churn = report["churn"]
    assert set(churn["home_moves"]["ring"]) == {"remove", "add"}
    assert churn["run"]["churn"]["remove_at_tick"] == SMALL.warmup_ticks
    assert set(report["gpu_slots_sensitivity"]["runs"]) == {"8"}
    targets = report["targets"]
    for name in ("gpu_hit_rate", "load_imbalance", "home_moves"):
        assert isinstance(targets[name]["met"], bool)
    assert set(targets["round_robin"]) == {"gpu_hit_rate", "load_imbalance"}


def test_bounded_load_beats_round_robin_on_hits_and_keeps_its_bound(report: dict) -> None:
    runs = report["results"]["1.0"]
    assert runs["bounded_load"]["gpu_hit_rate"] > runs["round_robin"]["gpu_hit_rate"] + 0.2
    # The bound holds when a request is placed; departures elsewhere can lift a tick's max/mean past it.
    assert runs["bounded_load"]["load_imbalance"] <= SMALL.capacity_factor
    assert runs["bounded_load"]["load_imbalance"] < runs["random"]["load_imbalance"]
    assert runs["bounded_load"]["load_imbalance"] < runs["consistent_hash"]["load_imbalance"]


def test_same_config_same_figures() -> None:
    first, second = (simulate(SMALL, 1.0, "bounded_load") for _ in range(2))
    first.pop("wall_s"), second.pop("wall_s")
    assert first == second


def test_write_report_writes_json_and_png(report: dict, tmp_path: Path) -> None:
    json_path, png_path = write_report(report, tmp_path)
    assert json_path.name == f"placement-sim-{report['date']}.json"
    assert json.loads(json_path.read_text())["results"] == report["results"]
    assert png_path.suffix == ".png" and png_path.stat().st_size > 0
    table = summary_table(report)
    assert "bounded_load" in table and "target gpu_hit_rate" in table


def test_main_writes_the_report_and_prints_the_table_and_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "--shards",
        "10",
        "--adapters",
        "200",
        "--alphas",
        "1.0",
        "--policies",
        "bounded_load,round_robin",
    ]
    argv += ["--gpu-slots", "8", "--cpu-slots", "16", "--max-running-requests", "8", "--warmup-ticks", "40"]
    argv += ["--measure-ticks", "20", "--refresh-ticks", "5", "--gpu-slots-sensitivity", ""]
    argv += ["--workers", "1", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    (json_path,) = tmp_path.glob("placement-sim-*.json")
    report = json.loads(json_path.read_text())
    assert set(report["results"]["1.0"]) == {"bounded_load", "round_robin"}
    assert report["config"]["num_shards"] == 10 and report["gpu_slots_sensitivity"]["runs"] == {}
    printed = capsys.readouterr().out
    assert "bounded_load" in printed and f"wrote {json_path} and " in printed


def test_unknown_policy_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--policies", "bounded_load,nope"])
    assert exit_info.value.code == 2
    assert "unknown policies ['nope']" in capsys.readouterr().err


def test_churn_hit_rate_before_removal_reads_the_warm_up_even_when_shorter_than_five_windows() -> None:
    # warm-up (20 ticks) shorter than the 5 refresh windows (25 ticks) the "before" rate looks back over
    config = replace(SMALL, warmup_ticks=20, measure_ticks=20)
    churn = simulate(config, 1.0, "bounded_load", churn=True)
    windows = churn["hit_rate_timeline"][: config.warmup_ticks // config.refresh_ticks]
    before = churn["churn"]["hit_rate_before"]
    assert max(windows) > 0
    assert min(windows) <= before <= max(windows)


def test_too_short_a_measurement_for_the_churn_run_is_refused() -> None:
    with pytest.raises(ValueError, match="measure_ticks must be >= 2"):
        replace(SMALL, measure_ticks=1)
