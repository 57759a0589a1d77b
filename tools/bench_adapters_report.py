"""The multi-adapter benchmark's report: per-system timings and per-tier load latencies in, JSON + PNG
+ a summary table out (the JSON is the record; the plot and the table are views of it)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from loraplex.shard.adapter_slots import TierCounters
from loraplex.tools.bench_report import SystemRun, machine_info, percentiles_ms
from loraplex.tools.report_files import pyplot, write_json_and_png

if TYPE_CHECKING:
    from loraplex.tools.bench_adapters import AdapterBenchConfig

TARGET_VS_BASE = 0.85  # adapters_100 / base_only
TARGET_VS_PEFT = 5.0  # adapters_100 / peft_100


@dataclass
class TierLatencies:
    """Seconds per adapter load, by the step of the tier chain that did it."""

    source_to_disk: list[float] = field(default_factory=list)  # fetch into the disk cache
    disk_to_cpu: list[float] = field(default_factory=list)  # read + validate into host memory
    cpu_to_slot: list[float] = field(default_factory=list)  # into the LoRA backend's slot

    def add_store(self, cpu: TierCounters, disk: TierCounters) -> None:
        self.source_to_disk += disk.load_seconds
        self.disk_to_cpu += cpu.load_seconds

    def add_slots(self, slots: TierCounters) -> None:
        self.cpu_to_slot += slots.load_seconds

    def summary(self) -> dict[str, dict | None]:
        return {
            name: _latency(seconds)
            for name, seconds in (
                ("source_to_disk", self.source_to_disk),
                ("disk_to_cpu", self.disk_to_cpu),
                ("cpu_to_slot", self.cpu_to_slot),
            )
        }


def _latency(seconds: Iterable[float]) -> dict | None:
    values = list(seconds)
    summary = percentiles_ms(values)
    return None if summary is None else {"count": len(values), **summary}


def build_report(
    config: AdapterBenchConfig,
    started: datetime,
    prompts: list[list[int]],
    levels: dict[int, list[int]],
    runs: list[SystemRun],
    tiers: dict[str, dict],
    latencies: TierLatencies,
    round_ratios: dict[str, list[float]],
    paired_ratios: dict[str, list[float]],
) -> dict:
    """round_ratios: each level's throughput over base-only's, per round (runs minutes apart);
    paired_ratios: the same from back-to-back batch pairs seconds apart (steadier on a noisy machine)."""
    from loraplex.tools.bench_engine import baseline_dtype  # torch and transformers: not at import

    systems = {run.name: run.summary() for run in runs}
    for name, figures in tiers.items():
        systems[name].update(figures)
    lengths = [len(p) for p in prompts]
    return {
        "benchmark": "adapters",
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine_info(config.device),
        "model": config.model_dir.name,
        "model_dir": str(config.model_dir),
        "workload": {
            "seed": config.seed,
            "dtype": str(baseline_dtype(config.device)).removeprefix("torch."),
            "kv_cache_bytes": config.kv_cache_bytes,
            "num_requests_per_level": config.num_requests,
            "concurrency": config.concurrency,
            "max_new_tokens": config.max_new_tokens,
            "ignore_eos": True,
            "sampling": "greedy",
            "popularity": f"zipf, alpha={config.zipf_alpha}",
            "zipf_alpha": config.zipf_alpha,
            "adapter_counts": list(levels),
            "adapter_ranks": list(config.ranks),
            "adapter_targets": list(config.targets),
            "max_gpu_adapters": config.max_gpu_adapters,
            "max_cpu_adapters": config.max_cpu_adapters,
            "prompt_tokens": {
                "min": min(lengths),
                "mean": round(sum(lengths) / len(lengths), 1),
                "max": max(lengths),
            },
            "rounds": config.rounds,
            "pairs": config.pairs,
            "paired_new_tokens": config.paired_new_tokens,
            "prefix_caching": config.prefix_caching,
            "baseline_adapters": config.baseline_adapters,
            "baseline_requests": config.baseline_requests,
            "peft_baseline": (
                f"transformers + peft in the engine's dtype, one request at a time, set_adapter before "
                f"each (timed with it); the first {config.baseline_requests} requests of the "
                f"{config.baseline_adapters}-adapter level, adapters loaded before timing"
            ),
        },
        "systems": systems,
        "ratios": _ratios(runs, round_ratios),
        "ratios_per_round": round_ratios,
        "paired_batch_ratios": {
            name: {"median": round(float(np.median(values)), 3), "pairs": values}
            for name, values in paired_ratios.items()
        },
        "definitions": {
            "level/base_only": "median over rounds of the level's tok/s over base-only's in the same round",
            "x/peft": "tok/s over the whole run over the peft baseline's tok/s",
            "paired_batch_ratios": (
                "base-only batch time over the level's for one batch of `concurrency` requests run inline, "
                "in back-to-back pairs"
            ),
        },
        "adapter_load_latency_ms": latencies.summary(),
        "targets": _targets(runs, config.baseline_adapters, round_ratios),
    }


def _ratios(runs: list[SystemRun], round_ratios: dict[str, list[float]]) -> dict[str, float]:
    ratios = {name: round(float(np.median(values)), 3) for name, values in round_ratios.items()}
    peft = next((run for run in runs if run.kind == "hf"), None)
    if peft is not None:
        for run in runs:
            if run.kind == "engine":
                ratios[f"{run.name}/{peft.name}"] = round(run.throughput_tok_s / peft.throughput_tok_s, 2)
    return ratios


def _targets(runs: list[SystemRun], num_adapters: int, round_ratios: dict[str, list[float]]) -> list[dict]:
    """The issue's goals, stated at 100 adapters (the level the peft baseline replays)."""
    by_name = {run.name: run for run in runs}
    level = by_name.get(f"adapters_{num_adapters}")
    if level is None:
        return []
    values = {"base_only": float(np.median(round_ratios.get(f"{level.name}/base_only", [np.nan])))}
    peft = by_name.get(f"peft_{num_adapters}")
    if peft is not None:
        values[peft.name] = level.throughput_tok_s / peft.throughput_tok_s
    targets = []
    for other, required in (("base_only", TARGET_VS_BASE), (f"peft_{num_adapters}", TARGET_VS_PEFT)):
        if other in values:
            value = values[other]
            ratio = f"{level.name}/{other}"
            targets.append(
                {"ratio": ratio, "value": round(value, 3), "required": required, "met": value >= required}
            )
    return targets


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """adapters-<device>-<date>.json and .png in output_dir; a rerun the same day replaces them."""
    device = report["machine"]["device"].replace(":", "")
    return write_json_and_png(report, output_dir / f"adapters-{device}-{report['date']}", plot_report)


def plot_report(report: dict, path: Path) -> None:
    """Throughput of every system beside adapter load latency p50/p99 per tier step."""
    plt = pyplot()

    systems = report["systems"]
    names = list(systems)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = [
        "tab:gray" if systems[n]["kind"] == "hf" else "tab:green" if n == "base_only" else "tab:blue"
        for n in names
    ]
    bars = left.bar(names, [systems[n]["throughput_tok_s"] for n in names], color=colors)
    left.bar_label(bars, fmt="%.0f")
    left.set_ylabel("generated tokens / s")
    left.set_title(f"Throughput, {report['workload']['concurrency']} requests in flight")
    steps = [(name, value) for name, value in report["adapter_load_latency_ms"].items() if value is not None]
    x = np.arange(len(steps))
    for offset, quantile in ((-0.2, "p50"), (0.2, "p99")):
        right.bar(x + offset, [value[quantile] for _, value in steps], width=0.4, label=quantile)
    right.set_xticks(x, [name.replace("_", " ") for name, _ in steps])
    right.set_ylabel("ms")
    right.set_title("Adapter load latency per tier step")
    right.legend()
    plt.setp(left.get_xticklabels(), rotation=30, ha="right")
    workload = report["workload"]
    fig.suptitle(
        f"{report['model']} on {report['machine']['device']} ({report['machine']['cpu_count']} CPUs): "
        f"{workload['popularity']}, ranks {workload['adapter_ranks']}, {report['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(report: dict) -> str:
    def ms(value: dict | None, quantile: str) -> str:
        return "-" if value is None else f"{value[quantile]:.0f}"

    lines = [
        f"{'system':<15}{'tok/s':>9}{'TTFT p50':>10}{'TTFT p99':>10}{'TPOT p50':>10}{'adapters':>10}  (ms)"
    ]
    for name, s in report["systems"].items():
        used = s.get("distinct_adapters_used", "")
        lines.append(
            f"{name:<15}{s['throughput_tok_s']:>9.1f}{ms(s['ttft_ms'], 'p50'):>10}{ms(s['ttft_ms'], 'p99'):>10}"
            f"{ms(s['tpot_ms'], 'p50'):>10}{used:>10}"
        )
    lines += [f"{name}: {ratio}x" for name, ratio in report["ratios"].items()]
    for step, value in report["adapter_load_latency_ms"].items():
        if value is not None:
            lines.append(
                f"load {step}: p50 {value['p50']:.1f} ms, p99 {value['p99']:.1f} ms ({value['count']} loads)"
            )
    for name, paired in report["paired_batch_ratios"].items():
        lines.append(f"paired batches {name}: median {paired['median']}x over {paired['pairs']}")
    for target in report["targets"]:
        verdict = "met" if target["met"] else "NOT met"
        lines.append(f"target {target['ratio']} >= {target['required']}x: {verdict} ({target['value']:.2f}x)")
    return "\n".join(lines)
