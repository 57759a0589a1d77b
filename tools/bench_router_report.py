"""The router benchmark's report: latencies and load runs in, JSON + PNG + a summary table out (the JSON
is the record; the plot and the table are views of it), with the issue's targets checked against it.

bench_report (percentiles, machine info) imports torch, so it is imported inside the functions that
need it: the stand-in shards and client processes import this module and should start in well under
a second.
"""

from __future__ import annotations

import platform
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

from loraplex.protos.rpc import server_event_loop
from loraplex.tools.report_files import pyplot, write_json_and_png

if TYPE_CHECKING:
    from loraplex.tools.bench_router import RouterBenchConfig

TARGETS = {"added_p50_ms": 1.0, "routed_streams_per_s": 2000.0}  # the "done when"
DEFINITIONS = {
    "latency": "ms from opening a stream to its last chunk, one stream at a time; direct and routed "
    "requests alternate, direct ones go to the stand-in shards in turn",
    "added_ms": "routed percentile minus direct percentile (a difference of distributions, not per pair)",
    "streams_per_s": "closed-loop streams that finished inside the measured window, over its length, "
    "summed over client processes",
    "cpu_s": "user + system CPU seconds each server process used during the measured window",
    "routed_streams_per_router_cpu_s": "routed streams/s divided by the router's CPU use: what one router "
    "process could sustain with a whole core to itself",
}


@dataclass
class LoadRun:
    """One throughput run: closed-loop streams to `target` ("direct" or "routed")."""

    target: str
    concurrency: int
    num_client_processes: int
    duration_s: float
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cpu_s: dict[str, float] = field(default_factory=dict)  # "router" and shard ids -> CPU seconds

    @property
    def streams_per_s(self) -> float:
        return len(self.latencies_s) / self.duration_s

    def summary(self) -> dict:
        from loraplex.tools.bench_report import percentiles_ms

        return {
            "concurrency": self.concurrency,
            "client_processes": self.num_client_processes,
            "duration_s": self.duration_s,
            "num_streams": len(self.latencies_s),
            "streams_per_s": round(self.streams_per_s, 1),
            "errors": dict(self.errors),
            "stream_latency_ms": percentiles_ms(self.latencies_s),
            "cpu_s": {name: round(seconds, 2) for name, seconds in self.cpu_s.items()},
        }


def build_report(
    config: RouterBenchConfig,
    started: datetime,
    direct_s: list[float],
    routed_s: list[float],
    loads: list[LoadRun],
) -> dict:
    from loraplex.tools.bench_report import machine_info, percentiles_ms

    direct, routed = percentiles_ms(direct_s), percentiles_ms(routed_s)
    added = {q: round(routed[q] - direct[q], 2) for q in ("p50", "p99", "mean")}
    runs = {run.target: run for run in loads}
    throughput: dict = {target: run.summary() for target, run in runs.items()}
    if "direct" in runs and "routed" in runs:
        throughput["routed/direct"] = round(runs["routed"].streams_per_s / runs["direct"].streams_per_s, 3)
        router_cpu_s = runs["routed"].cpu_s.get("router", 0.0)
        if router_cpu_s > 0:
            per_cpu_s = runs["routed"].streams_per_s * runs["routed"].duration_s / router_cpu_s
            throughput["routed_streams_per_router_cpu_s"] = round(per_cpu_s, 1)
    machine = machine_info("cpu")
    machine |= {
        "python": platform.python_version(),
        "grpc": grpc.__version__,
        "event_loop": server_event_loop(),
    }
    return {
        "benchmark": "router",
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": machine,
        "setup": {
            "stand_in_shards": config.num_shards,
            "chunks_per_stream": config.num_chunks,
            "router_processes": 1,
            "latency_requests": config.num_latency_requests,
            "latency_warmup_requests": config.num_warmup_requests,
            "concurrency": config.concurrency,
            "client_processes": config.num_client_processes,
            "throughput_warmup_s": config.throughput_warmup_s,
            "throughput_duration_s": config.throughput_duration_s,
            "note": f"router, stand-in shards, redis and clients share this machine's "
            f"{machine['cpu_count']} CPUs",
        },
        "latency": {"direct_ms": direct, "routed_ms": routed, "added_ms": added},
        "throughput": throughput,
        "targets": check_targets(added, throughput),
        "definitions": DEFINITIONS,
    }


def check_targets(added_ms: dict, throughput: dict) -> dict:
    checks = {}
    checks["added_p50_ms"] = {
        "value": added_ms["p50"],
        "required": f"<= {TARGETS['added_p50_ms']}",
        "met": added_ms["p50"] <= TARGETS["added_p50_ms"],
    }
    if "routed" in throughput:
        rate = throughput["routed"]["streams_per_s"]
        checks["routed_streams_per_s"] = {
            "value": rate,
            "required": f">= {TARGETS['routed_streams_per_s']:.0f}",
            "met": rate >= TARGETS["routed_streams_per_s"],
        }
    return {**checks, "met": all(check["met"] for check in checks.values())}


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """router-cpu-<date>.json and .png in output_dir; a rerun the same day replaces them."""
    return write_json_and_png(
        report, output_dir / f"router-{report['machine']['device']}-{report['date']}", plot_report
    )


def plot_report(report: dict, path: Path) -> None:
    """Sequential latency p50/p99 direct vs routed beside streams/s direct vs routed, with the targets."""
    plt = pyplot()
    import numpy as np

    latency, throughput = report["latency"], report["throughput"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    x = np.arange(2)
    for offset, name, color in ((-0.2, "direct_ms", "tab:gray"), (0.2, "routed_ms", "tab:blue")):
        values = [latency[name]["p50"], latency[name]["p99"]]
        bars = left.bar(x + offset, values, width=0.4, label=name.removesuffix("_ms"), color=color)
        left.bar_label(bars, fmt="%.2f")
    left.set_xticks(x, ["p50", "p99"])
    left.set_ylabel("ms, call to last chunk")
    added = latency["added_ms"]
    left.set_title(f"Sequential stream latency (added p50 {added['p50']:.2f}, p99 {added['p99']:.2f} ms)")
    left.legend()
    targets = [t for t in ("direct", "routed") if t in throughput]
    colors = ["tab:gray" if t == "direct" else "tab:blue" for t in targets]
    bars = right.bar(targets, [throughput[t]["streams_per_s"] for t in targets], color=colors)
    right.bar_label(bars, fmt="%.0f")
    right.axhline(TARGETS["routed_streams_per_s"], color="tab:red", linestyle="--", label="target (routed)")
    right.set_ylabel("streams / s")
    concurrency = throughput[targets[0]]["concurrency"] if targets else 0
    right.set_title(f"Throughput, {concurrency} streams in flight")
    right.legend()
    setup, machine = report["setup"], report["machine"]
    fig.suptitle(
        f"Router overhead: {setup['stand_in_shards']} stand-in shards, {setup['chunks_per_stream']} chunks/stream, "
        f"{setup['client_processes']} client processes, {machine['cpu_count']} CPUs shared, {report['date']}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary_table(report: dict) -> str:
    latency, throughput = report["latency"], report["throughput"]
    lines = [f"{'latency (ms)':<16}{'p50':>8}{'p99':>8}{'mean':>8}"]
    for name in ("direct_ms", "routed_ms", "added_ms"):
        row = latency[name]
        lines.append(f"{name.removesuffix('_ms'):<16}{row['p50']:>8.2f}{row['p99']:>8.2f}{row['mean']:>8.2f}")
    lines.append(f"{'throughput':<16}{'streams/s':>10}{'p50 ms':>8}{'p99 ms':>8}{'router cpu s':>14}  errors")
    for target in ("direct", "routed"):
        if target not in throughput:
            continue
        run = throughput[target]
        timing = run["stream_latency_ms"] or {"p50": float("nan"), "p99": float("nan")}
        router_cpu = run["cpu_s"].get("router", float("nan"))
        lines.append(
            f"{target:<16}{run['streams_per_s']:>10.1f}{timing['p50']:>8.2f}{timing['p99']:>8.2f}"
            f"{router_cpu:>14.2f}  {run['errors'] or '-'}"
        )
    if "routed/direct" in throughput:
        lines.append(f"routed/direct: {throughput['routed/direct']:.2f}x")
    if "routed_streams_per_router_cpu_s" in throughput:
        lines.append(
            f"routed streams per router CPU-second: {throughput['routed_streams_per_router_cpu_s']:.0f}"
        )
    for name, check in report["targets"].items():
        if name != "met":
            verdict = "met" if check["met"] else "NOT met"
            lines.append(f"target {name} {check['required']}: {verdict} ({check['value']})")
    setup = report["setup"]
    lines.append(f"({setup['client_processes']} client processes; {setup['note']})")
    return "\n".join(lines)
