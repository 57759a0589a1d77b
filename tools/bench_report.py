"""Benchmark measurements and their report: per-request timings in, JSON + PNG + a summary table out.

Kept apart from bench_engine so that how systems are driven and how results are summarised change
independently; the JSON is the record, the plot and the table are views of it.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loraplex.tools.report_files import pyplot, write_json_and_png

if TYPE_CHECKING:
    from loraplex.tools.bench_engine import BenchConfig

TARGET_RATIO = 2.0  # the goal: highest engine level >= 2x transformers static batching


@dataclass
class RequestTiming:
    """time.perf_counter() stamps of one request; first_token is None where it was not observed."""

    submitted: float = 0.0
    first_token: float | None = None
    finished: float = 0.0
    num_tokens: int = 0

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.submitted

    @property
    def tpot_s(self) -> float | None:
        """Per output token after the first: (finished - first) / (n - 1)."""
        if self.first_token is None or self.num_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.num_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.finished - self.submitted


@dataclass
class SystemRun:
    name: str  # e.g. engine_c32, hf_static_8
    kind: str  # "engine" or "hf"
    concurrency: int  # requests in flight at once (the batch size for static batching)
    wall_s: float
    timings: list[RequestTiming] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(t.num_tokens for t in self.timings)

    @property
    def throughput_tok_s(self) -> float:
        return self.num_tokens / self.wall_s

    def summary(self) -> dict:
        return {
            "kind": self.kind,
            "concurrency": self.concurrency,
            "num_requests": len(self.timings),
            "num_generated_tokens": self.num_tokens,
            "wall_s": round(self.wall_s, 3),
            "throughput_tok_s": round(self.throughput_tok_s, 2),
            "requests_per_s": round(len(self.timings) / self.wall_s, 3),
            "ttft_ms": percentiles_ms([t.ttft_s for t in self.timings]),
            "tpot_ms": percentiles_ms([t.tpot_s for t in self.timings]),
            "e2e_ms": percentiles_ms([t.e2e_s for t in self.timings]),
        }


def percentiles_ms(seconds: list[float | None]) -> dict[str, float] | None:
    values = [s * 1000 for s in seconds if s is not None]
    if not values:
        return None
    p50, p99 = np.percentile(values, [50, 99])
    return {  # to the microsecond: a slot swap takes a few
        "p50": round(float(p50), 3),
        "p99": round(float(p99), 3),
        "mean": round(float(np.mean(values)), 3),
    }


def build_report(
    config: BenchConfig, started: datetime, prompts: list[list[int]], runs: list[SystemRun]
) -> dict:
    from loraplex.tools.bench_engine import baseline_dtype  # a cycle at import: bench_engine imports us

    lengths = [len(p) for p in prompts]
    systems = {run.name: run.summary() for run in runs}
    return {
        "benchmark": "engine",
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(config.device),
        "model": config.model_dir.name,
        "model_dir": str(config.model_dir),
        "workload": {
            "num_requests": config.num_requests,
            "concurrency": list(config.concurrency),
            "max_new_tokens": config.max_new_tokens,
            "ignore_eos": True,
            "sampling": "greedy",
            "dtype": str(baseline_dtype(config.device)).removeprefix("torch."),  # engine and transformers
            "baseline_requests": config.baseline_requests,
            "static_batch_size": config.static_batch_size,
            "prompt_tokens": {
                "min": min(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
                "max": max(lengths),
            },
            "kv_cache_bytes": config.kv_cache_bytes,
            "max_batch_tokens": config.max_batch_tokens,
            "prefix_caching": "on, except systems named *_no_prefix_cache",
        },
        "systems": systems,
        "ratios": _throughput_ratios(runs),
        "target": _target(runs, config.static_batch_size),
    }


def machine_info(device: str) -> dict:
    import torch  # here, not at the top: the CLI imports the reports for its flags, and torch takes seconds
    import transformers

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _throughput_ratios(runs: list[SystemRun]) -> dict[str, float]:
    """Every engine level over every baseline, e.g. "engine_c32/hf_static_8": 3.1."""
    engines = [r for r in runs if r.kind == "engine"]
    baselines = [r for r in runs if r.kind == "hf"]
    return {
        f"{e.name}/{b.name}": round(e.throughput_tok_s / b.throughput_tok_s, 2)
        for e in engines
        for b in baselines
    }


def _target(runs: list[SystemRun], static_batch_size: int) -> dict | None:
    engines = [r for r in runs if r.kind == "engine"]
    static = next((r for r in runs if r.name == f"hf_static_{static_batch_size}"), None)
    if not engines or static is None:
        return None
    top = max((r for r in engines if r.name == f"engine_c{r.concurrency}"), key=lambda r: r.concurrency)
    ratio = top.throughput_tok_s / static.throughput_tok_s
    return {
        "ratio": f"{top.name}/{static.name}",
        "value": round(ratio, 2),
        "required": TARGET_RATIO,
        "met": ratio >= TARGET_RATIO,
    }


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """engine-<device>-<date>.json and .png in output_dir; a rerun the same day replaces them."""
    device = report["machine"]["device"].replace(":", "")
    return write_json_and_png(report, output_dir / f"engine-{device}-{report['date']}", plot_report)


def plot_report(report: dict, path: Path) -> None:
    """Throughput of every system beside TTFT p50/p99 of every system where it was observed."""
    plt = pyplot()

    systems = report["systems"]
    names = list(systems)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = ["tab:blue" if systems[n]["kind"] == "engine" else "tab:gray" for n in names]
    bars = left.bar(names, [systems[n]["throughput_tok_s"] for n in names], color=colors)
    left.bar_label(bars, fmt="%.0f")
    left.set_ylabel("generated tokens / s")
    left.set_title("Throughput")
    timed = [n for n in names if systems[n]["ttft_ms"] is not None]
    x = np.arange(len(timed))
    for offset, quantile in ((-0.2, "p50"), (0.2, "p99")):
        right.bar(x + offset, [systems[n]["ttft_ms"][quantile] for n in timed], width=0.4, label=quantile)
    right.set_xticks(x, timed)
    right.set_ylabel("ms")
    right.set_title("Time to first token")
    right.legend()
    for axis in (left, right):
        plt.setp(axis.get_xticklabels(), rotation=30, ha="right")
    workload = report["workload"]
    fig.suptitle(
        f"{report['model']} on {report['machine']['device']} ({report['machine']['cpu_count']} CPUs), "
        f"{workload['max_new_tokens']} new tokens/request, {report['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(report: dict) -> str:
    def ms(value: dict | None, quantile: str) -> str:
        return "-" if value is None else f"{value[quantile]:.0f}"

    header = f"{'system':<16}{'conc':>5}{'tok/s':>9}{'req/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
    header += f"{'TPOT p50':>10}{'e2e p50':>9}  (ms)"
    lines = [header]
    for name, s in report["systems"].items():
        lines.append(
            f"{name:<16}{s['concurrency']:>5}{s['throughput_tok_s']:>9.1f}{s['requests_per_s']:>8.2f}"
            f"{ms(s['ttft_ms'], 'p50'):>10}{ms(s['ttft_ms'], 'p99'):>10}"
            f"{ms(s['tpot_ms'], 'p50'):>10}{ms(s['e2e_ms'], 'p50'):>9}"
        )
    lines += [f"{name}: {ratio:.2f}x" for name, ratio in report["ratios"].items()]
    if report["target"]:
        target = report["target"]
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"target {target['ratio']} >= {target['required']}x: {verdict} ({target['value']:.2f}x)")
    return "\n".join(lines)
