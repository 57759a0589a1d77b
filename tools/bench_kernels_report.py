"""The kernel benchmark's report: per-case correctness and timings in, JSON + PNG + a summary table out
(the JSON is the record; the plot and the table are views of it)."""

from __future__ import annotations

import math
import os
import platform
import statistics
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.tools.report_files import pyplot, write_json_and_png

if TYPE_CHECKING:
    import torch

    from loraplex.tools.bench_kernels import KernelBenchConfig

MODES = ("kernel", "eager")  # the two ways CudaTimer times a call; on CPU only eager


def compare(actual: torch.Tensor, expected: torch.Tensor, tolerance: tuple[float, float]) -> dict:
    """Worst errors of actual against expected and whether every element is within atol + rtol * |e|
    (tolerance_ratio <= 1); max_rel_error is over the elements where |expected| > atol. A NaN or an
    infinity fails, its errors reported as None (JSON has no NaN)."""
    atol, rtol = tolerance
    error = (actual.double() - expected.double()).abs()
    scale = expected.double().abs()
    large = scale > atol
    finite = bool(error.isfinite().all())
    figures = {
        "max_abs_error": error.max(),
        "max_rel_error": (error[large] / scale[large]).max() if bool(large.any()) else 0.0,
        "tolerance_ratio": (error / (atol + rtol * scale)).max(),
    }
    result = {name: round(float(value), 6) if finite else None for name, value in figures.items()}
    passed = finite and result["tolerance_ratio"] <= 1.0
    return {**result, "atol": atol, "rtol": rtol, "passed": passed}


def time_stats(times_us: list[float]) -> dict:
    """Median and spread of one system's timed calls, in microseconds."""
    ordered = sorted(times_us)

    def quantile(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, math.floor(q * len(ordered)))], 2)

    return {
        "median": round(statistics.median(ordered), 2),
        "p10": quantile(0.1),
        "p90": quantile(0.9),
        "reps": len(ordered),
    }


def machine_info(device: torch.device) -> dict:
    """Where the figures come from (no transformers here: the GPU machine may lack it)."""
    import torch
    import triton

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def build_report(
    config: KernelBenchConfig,
    started: datetime,
    machine: dict,
    interpreted: bool,
    timing_method: str,
    cases: list[dict],
) -> dict:
    for case in cases:
        _add_ratios(case)
    failed = [_failure(case) for case in cases if not case["correctness"]["passed"]]
    return {
        "benchmark": "kernels",
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine,
        "interpreted": interpreted,
        "config": {
            **{
                name: value for name, value in asdict(config).items() if name not in ("output_dir", "batches")
            },
            "batches": {batch.name: _describe(batch.sequence_tokens) for batch in config.batches},
            "tolerances": "tests/test_lora_kernels.py's, per dtype: |actual - expected| <= atol + rtol * |expected|",
        },
        "timing": {"method": timing_method, "unit": "microseconds per call"},
        "definitions": {
            "kernels": "lora_kernels.shrink + lora_kernels.expand, one launch each (metadata built before timing)",
            "baseline": (
                "per adapter in the step, y[rows, slice] += s * (x[rows] @ A^T) @ B^T in the operands' dtype "
                "(x @ A^T, then addmm_ into y), A and B at the adapter's own rank, rows contiguous by slot"
            ),
            "base_projection": "x @ W^T alone (F.linear), the dense layer the LoRA delta is added to",
            "reference": "lora_ops.shrink_reference + expand_reference: float32 torch on the same device",
            "speedup": "baseline time / kernels time, per way of timing (median times)",
            "overhead_vs_base": "LoRA time / base projection time (kernels, and the baseline loop)",
            "tolerance_ratio": "max |actual - expected| / (atol + rtol * |expected|); passed when <= 1",
        },
        "summary": {
            "num_cases": len(cases),
            "num_failed": len(failed),
            "failed": failed,
            "speedup": {mode: _spread([c["speedup"][mode] for c in cases]) for mode in MODES},
        },
        "cases": cases,
    }


def _describe(sequence_tokens: tuple[int, ...]) -> str:
    """(512, 512, 1, 1, 1) -> '2 x 512 + 3 x 1': sequences x tokens each, in order."""
    runs: list[list[int]] = []
    for tokens in sequence_tokens:
        if runs and runs[-1][1] == tokens:
            runs[-1][0] += 1
        else:
            runs.append([1, tokens])
    return " + ".join(f"{count} x {tokens}" for count, tokens in runs)


def _add_ratios(case: dict) -> None:
    times = case["time_us"]
    base = times.get("base_projection")
    case["speedup"] = {mode: _ratio(times["baseline"], times["kernels"], mode) for mode in MODES}
    case["overhead_vs_base"] = {
        system: {mode: _ratio(times[system], base, mode) for mode in MODES} if base else None
        for system in ("kernels", "baseline")
    }


def _ratio(numerator: dict | None, denominator: dict | None, mode: str) -> float | None:
    if not numerator or not denominator or not numerator[mode] or not denominator[mode]:
        return None
    return round(numerator[mode]["median"] / max(denominator[mode]["median"], 1e-3), 3)


def _failure(case: dict) -> dict:
    checks = case["correctness"]
    if "error" in checks:
        return {"name": case["name"], "error": checks["error"]}
    return {
        "name": case["name"],
        "shrink_tolerance_ratio": checks["shrink"]["tolerance_ratio"],
        "output_tolerance_ratio": checks["output"]["tolerance_ratio"],
        "outside_slice_unchanged": checks["outside_slice_unchanged"],
    }


def _spread(values: list[float | None]) -> dict | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"min": min(present), "median": round(statistics.median(present), 3), "max": max(present)}


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def groups(report: dict) -> dict[tuple[str, str, int], list[dict]]:
    """The cases by (dtype, batch kind, distinct adapters), over projections, ranks and mixes."""
    grouped: dict[tuple[str, str, int], list[dict]] = {}
    for case in report["cases"]:
        grouped.setdefault((case["dtype"], case["batch"], case["adapters"]), []).append(case)
    return grouped


def primary_mode(report: dict) -> str:
    """kernel where it was timed (CUDA), eager otherwise."""
    return "eager" if report["interpreted"] or report["machine"]["device"].startswith("cpu") else "kernel"


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """kernels-<device>-<date>.json and .png in output_dir; a rerun the same day replaces them."""
    device = report["machine"]["device"].replace(":", "")
    return write_json_and_png(report, output_dir / f"kernels-{device}-{report['date']}", plot_report)


def plot_report(report: dict, path: Path) -> None:
    """Per dtype (columns): median speed-up over the baseline loop vs distinct adapters, one line per
    batch kind, for each way of timing; then the kernels' overhead on the dense projection."""
    plt = pyplot()

    modes = [mode for mode in MODES if any(c["speedup"][mode] is not None for c in report["cases"])]
    rows = [("speedup", mode) for mode in modes]
    if any(c["overhead_vs_base"]["kernels"] for c in report["cases"]):
        rows.append(("overhead_vs_base", primary_mode(report)))
    dtypes = list(dict.fromkeys(c["dtype"] for c in report["cases"]))
    fig, axes = plt.subplots(
        len(rows), len(dtypes), figsize=(5.5 * len(dtypes), 3.6 * len(rows)), squeeze=False
    )
    grouped = groups(report)
    counts = sorted({c["adapters"] for c in report["cases"]})
    for column, dtype in enumerate(dtypes):
        for row, (figure, mode) in enumerate(rows):
            axis = axes[row][column]
            for batch in dict.fromkeys(c["batch"] for c in report["cases"]):
                points = sorted(
                    (count, _median([_value(c, figure, mode) for c in cases]))
                    for (d, b, count), cases in grouped.items()
                    if d == dtype and b == batch
                )
                points = [(count, value) for count, value in points if value is not None]
                if points:
                    axis.plot(*zip(*points, strict=True), marker="o", label=batch)
            axis.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
            axis.set_xscale("log", base=2)
            axis.set_yscale("log")  # ratios: a 10x gain and a 10x loss the same distance from 1
            axis.set_xticks(counts, [str(count) for count in counts])
            axis.set_xlabel("distinct adapters in the step")
            axis.set_ylabel(
                f"baseline / kernels ({mode})" if figure == "speedup" else f"kernels / x @ W^T ({mode})"
            )
            what = "speed-up over the loop" if figure == "speedup" else "LoRA overhead on the layer"
            axis.set_title(f"{dtype}: {what}, {mode} timing")
            if axis.get_legend_handles_labels()[1]:
                axis.legend(fontsize="small")
    machine = report["machine"]
    where = machine.get("device_name", machine["device"])
    note = "\nTriton interpreter: the times are not the kernels' speed" if report["interpreted"] else ""
    fig.suptitle(
        f"Multi-LoRA kernels on {where}, {report['date']}\nmedians over projections, ranks, mixes{note}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _time(case: dict, system: str, mode: str) -> float | None:
    timing = case["time_us"].get(system)
    return timing[mode]["median"] if timing and timing[mode] else None


def _value(case: dict, figure: str, mode: str) -> float | None:
    if figure == "speedup":
        return case["speedup"][mode]
    overhead = case["overhead_vs_base"]["kernels"]
    return overhead[mode] if overhead else None


def summary_table(report: dict) -> str:
    """One line per (dtype, batch kind, adapters): medians over the group's projections, ranks, mixes."""
    mode = primary_mode(report)

    def us(cases: list[dict], system: str) -> str:
        value = _median([_time(c, system, mode) for c in cases])
        return "-" if value is None else f"{value:.1f}"

    def ratio(values: list[float | None]) -> str:
        value = _median(values)
        return "-" if value is None else f"{value:.3g}x"

    lines = [
        f"median us per call ({mode} timing{', Triton interpreter' if report['interpreted'] else ''}); "
        "speed-up = baseline loop / kernels; overhead = kernels / x @ W^T",
        f"{'dtype':<10}{'batch':<11}{'adapters':>9}{'cases':>6}{'failed':>7}{'kernels':>10}{'loop':>10}"
        f"{'x@W^T':>10}{'speed-up':>10}{'(eager)':>9}{'overhead':>10}",
    ]
    for (dtype, batch, count), cases in groups(report).items():
        failed = sum(not c["correctness"]["passed"] for c in cases)
        lines.append(
            f"{dtype:<10}{batch:<11}{count:>9}{len(cases):>6}{failed:>7}"
            f"{us(cases, 'kernels'):>10}{us(cases, 'baseline'):>10}{us(cases, 'base_projection'):>10}"
            f"{ratio([c['speedup'][mode] for c in cases]):>10}"
            f"{ratio([c['speedup']['eager'] for c in cases]):>9}"
            f"{ratio([_value(c, 'overhead_vs_base', mode) for c in cases]):>10}"
        )
    summary = report["summary"]
    lines.append(
        f"{summary['num_cases'] - summary['num_failed']}/{summary['num_cases']} cases within tolerance"
    )
    for f in summary["failed"]:
        if "error" in f:
            lines.append(f"FAILED {f['name']}: {f['error']}")
        else:
            lines.append(
                f"FAILED {f['name']}: shrink {f['shrink_tolerance_ratio']}, output {f['output_tolerance_ratio']} "
                f"x tolerance, outside slice unchanged: {f['outside_slice_unchanged']}"
            )
    return "\n".join(lines)
