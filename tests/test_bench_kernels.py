"""`loraplex bench kernels` on CPU, the Triton kernels in the interpreter: the tiny grid passes and is
reported, a wrong kernel result fails the run, and the command the GPU machine gets runs from a bare
copy of the repository. The figures here are not speed; the same code times the kernels on CUDA."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
import torch

from loraplex.shard import lora_kernels
from loraplex.shard.lora_ops import NO_SLOT, build_lora_metadata
from loraplex.tools import cli
from loraplex.tools.bench_kernels import (
    TINY,
    TINY_BATCHES,
    BatchKind,
    Case,
    KernelBenchConfig,
    load_kernels,
    mix_counts,
    run_kernel_bench,
    step_runs,
)
from loraplex.tools.bench_kernels_report import summary_table

REPO = Path(__file__).resolve().parents[1]
DECODE, _, MIXED = TINY_BATCHES


def test_tiny_grid_passes_in_the_interpreter_and_is_reported(tmp_path: Path):
    config = KernelBenchConfig.quick(
        dtypes=("bfloat16",), batches=(DECODE, MIXED), reps=1, output_dir=tmp_path
    )
    result = run_kernel_bench(config)

    report = json.loads(result.json_path.read_text())
    assert result.json_path.name == f"kernels-cpu-{report['date']}.json"
    assert date.fromisoformat(report["date"])
    assert result.png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["benchmark"] == "kernels" and report["interpreted"] is True
    assert {"torch", "triton", "device"} <= set(report["machine"])
    assert report["timing"]["unit"] == "microseconds per call" and "interpreter" in report["timing"]["method"]
    # 2 projections x (decode, mixed) x (identical-1, uniform-3, zipf-3)
    summary = report["summary"]
    assert (summary["num_cases"], summary["num_failed"], summary["failed"]) == (12, 0, [])
    assert result.passed
    for case in report["cases"]:
        checks = case["correctness"]
        assert checks["passed"] and checks["outside_slice_unchanged"], case["name"]
        assert 0 <= checks["output"]["tolerance_ratio"] <= 1 and checks["output"]["max_abs_error"] is not None
        slots = [slot for _, slot, _ in case["segments"]]
        assert slots == sorted(set(slots)) and len(slots) == case["adapters"]  # one segment per adapter
        assert sum(tokens for tokens, _, _ in case["segments"]) == case["num_tokens"]
        for system in ("kernels", "baseline", "base_projection"):
            assert case["time_us"][system]["kernel"] is None  # no CUDA events on CPU
            assert case["time_us"][system]["eager"]["median"] > 0
        assert case["speedup"]["eager"] > 0 and case["overhead_vs_base"]["kernels"]["eager"] > 0
    assert {c["projection"]["out_offset"] for c in report["cases"]} == {0, 136}  # a fused output's slice
    assert "12/12 cases within tolerance" in summary_table(report)


def test_a_wrong_kernel_result_is_named_and_fails_the_command(monkeypatch, tmp_path: Path, capsys):
    real_expand = lora_kernels.expand

    def expand_skipping_the_last_segment(y, shrunk, lora_b, scalings, meta, *args):
        runs = [(slot, length) for _, length, slot in meta.segments]
        runs[-1] = (NO_SLOT, runs[-1][1])
        real_expand(y, shrunk, lora_b, scalings, build_lora_metadata(runs, meta.device), *args)

    monkeypatch.setattr(lora_kernels, "expand", expand_skipping_the_last_segment)
    flags = "--projections tiny_q --dtypes float16 --batches decode --adapter-counts 3 --mixes uniform"
    code = cli.main(
        ["bench", "kernels", "--device", "cpu", *flags.split(), "--reps", "1", "--output-dir", str(tmp_path)]
    )

    assert code == 1
    (json_path,) = tmp_path.glob("kernels-cpu-*.json")
    report = json.loads(json_path.read_text())
    name = "tiny_q/float16/r4-16/decode/uniform-3"
    assert [failure["name"] for failure in report["summary"]["failed"]] == [name]
    checks = report["cases"][0]["correctness"]
    assert checks["shrink"]["passed"] and not checks["output"]["passed"]
    assert checks["output"]["tolerance_ratio"] > 1
    assert f"FAILED {name}" in capsys.readouterr().out


def test_a_kernel_that_raises_fails_its_case_and_the_run_still_reports(monkeypatch, tmp_path: Path):
    def shrink_that_does_not_compile(*args):
        raise RuntimeError("PTX assembly failed")

    monkeypatch.setattr(lora_kernels, "shrink", shrink_that_does_not_compile)
    config = KernelBenchConfig.quick(
        projections=TINY[:1],
        dtypes=("float16",),
        batches=(DECODE,),
        adapter_counts=(1,),
        reps=1,
        output_dir=tmp_path,
    )
    result = run_kernel_bench(config)

    assert not result.passed and result.png_path.is_file()
    (failure,) = result.report["summary"]["failed"]
    assert failure == {
        "name": "tiny_q/float16/r4-16/decode/identical-1",
        "error": "RuntimeError: PTX assembly failed",
    }
    case = result.report["cases"][0]
    assert case["time_us"]["kernels"] is None and case["time_us"]["baseline"]["eager"]["median"] > 0
    assert "FAILED tiny_q/float16/r4-16/decode/identical-1: RuntimeError" in summary_table(result.report)


@pytest.mark.parametrize(
    ("mix", "num_sequences", "num_adapters", "expected"),
    [
        ("identical", 64, 1, [64]),
        ("uniform", 10, 4, [3, 3, 2, 2]),
        ("uniform", 64, 64, [1] * 64),
        ("zipf", 64, 4, [30, 15, 11, 8]),  # 1 each, then 60 in proportion to 1, 1/2, 1/3, 1/4
        ("zipf", 4, 4, [1, 1, 1, 1]),
    ],
)
def test_mixes_spread_sequences_over_exactly_the_asked_adapters(mix, num_sequences, num_adapters, expected):
    assert mix_counts(mix, num_sequences, num_adapters) == expected


@pytest.mark.parametrize(("mix", "num_sequences", "num_adapters"), [("identical", 8, 2), ("uniform", 4, 5)])
def test_impossible_mixes_are_refused(mix, num_sequences, num_adapters):
    with pytest.raises(ValueError, match="cannot spread"):
        mix_counts(mix, num_sequences, num_adapters)


def test_a_steps_tokens_are_grouped_by_slot_as_the_engine_orders_them():
    batch = BatchKind("mixed", (512,) * 2 + (1,) * 62)
    case = Case(TINY[0], "bfloat16", (16,), batch, 16, "zipf")
    runs = step_runs(case, num_slots=64, zipf_alpha=1.0, rng=random.Random(0))
    meta = build_lora_metadata(runs)
    assert meta.num_tokens == 2 * 512 + 62
    assert len(meta.segments) == 16 == len({slot for _, _, slot in meta.segments})
    assert [slot for _, _, slot in meta.segments] == sorted(slot for _, _, slot in meta.segments)


def test_cuda_run_refuses_interpreted_kernels():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=0"):
        load_kernels(torch.device("cuda"))


BLOCK_SERVING_PACKAGES = """
import importlib.abc, runpy, sys
class Absent(importlib.abc.MetaPathFinder):  # what the GPU machine may lack, and our editable install
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"grpc", "redis", "opentelemetry", "fastapi", "uvicorn", "transformers",
                                      "peft", "prometheus_client", "google"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
sys.meta_path[:] = [Absent()] + [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.argv = ["bench_kernels", *sys.argv[1:]]
runpy.run_module("loraplex.tools.bench_kernels", run_name="__main__", alter_sys=True)
"""


def test_documented_command_runs_from_a_bare_copy_without_serving_packages(tmp_path: Path):
    """The module docstring's recipe: the repository linked as `loraplex` on PYTHONPATH, no install,
    none of the serving stack importable; on CPU the tool picks the interpreter itself."""
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "loraplex").symlink_to(REPO)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "pkg")}
    env.pop("TRITON_INTERPRET", None)
    flags = "--device cpu --projections tiny_kv --dtypes float16 --batches prefill --reps 1"
    process = subprocess.run(
        [sys.executable, "-c", BLOCK_SERVING_PACKAGES, *flags.split(), "--output-dir", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert "1/1 cases within tolerance" in process.stdout
    assert len(list((tmp_path / "out").glob("kernels-cpu-*.png"))) == 1
