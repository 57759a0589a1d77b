"""The serving benchmark's report: per-request results in, JSON + PNG + a summary table out (the JSON is
the record; the plot and the table are views of it).

Per run: completed requests/s and output tokens/s over the run's span (first send to last finish),
TTFT, TPOT (per output token after the first) and end-to-end latency p50/p99, SLO attainment (TTFT and
TPOT both within their limits; a failed request misses it) and goodput (requests/s that met it). Per
rate: adapters over base-only for throughput and for latency.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.tools.bench_report import machine_info, percentiles_ms
from loraplex.tools.report_files import pyplot, write_json_and_png

if TYPE_CHECKING:
    from loraplex.tools.bench_serve import PrivateMesh, ServeBenchConfig, Target
    from loraplex.tools.workload import WorkloadSpec

DEFINITIONS = {
    "span_s": "first request sent to last request finished",
    "requests_per_s": "completed requests over the span; at an offered rate the mesh keeps up with, "
    "about that rate",
    "output_tok_s": "generated tokens of completed requests over the span",
    "ttft_ms": "request sent to its first chunk with text",
    "tpot_ms": "(last chunk - first chunk) / (generated tokens - 1), per request",
    "slo_attainment": "fraction of all requests that completed with TTFT and TPOT within the SLO",
    "goodput_requests_per_s": "requests that met the SLO over the span",
    "send_lag_ms": "how late the client sent requests against the plan (the open loop's fidelity)",
    "wrong_adapter": "completed requests whose response names another adapter than the request did",
    "adapters/base": "the adapters run's figure over the base-only run's at the same rate, arrivals and "
    "lengths (other prompt words)",
}


@dataclass
class RequestResult:
    """One request as the client saw it: perf_counter stamps, what came back, or the error code."""

    planned_at_s: float
    expected_adapter: str = ""
    lag_s: float = 0.0  # sent this much later than planned (the client falling behind)
    sent: float = 0.0
    first_chunk: float | None = None
    finished: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    served_adapter: str = ""
    error: str = ""  # a gRPC status name; empty when the request completed

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_chunk is None or self.error else self.first_chunk - self.sent

    @property
    def tpot_s(self) -> float | None:
        if self.first_chunk is None or self.error or self.completion_tokens < 2:
            return None
        return (self.finished - self.first_chunk) / (self.completion_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.error else self.finished - self.sent


@dataclass
class ServeRun:
    system: str  # "adapters" or "base"
    rate: float  # offered requests/s; inf: all at once
    results: list[RequestResult] = field(default_factory=list)

    def summary(self, slo_ttft_ms: float, slo_tpot_ms: float) -> dict:
        done = [r for r in self.results if not r.error]
        span_s = max(r.finished for r in self.results) - min(r.sent for r in self.results)
        met = [r for r in done if _meets(r, slo_ttft_ms, slo_tpot_ms)]
        return {
            "system": self.system,
            "rate": _rate_label(self.rate),
            "num_requests": len(self.results),
            "completed": len(done),
            "errors": dict(Counter(r.error for r in self.results if r.error)),
            "wrong_adapter": sum(r.served_adapter != r.expected_adapter for r in done),
            "span_s": round(span_s, 3),
            "requests_per_s": round(len(done) / span_s, 3),
            "output_tok_s": round(sum(r.completion_tokens for r in done) / span_s, 2),
            "prompt_tokens_mean": round(sum(r.prompt_tokens for r in done) / max(1, len(done)), 1),
            "ttft_ms": percentiles_ms([r.ttft_s for r in done]),
            "tpot_ms": percentiles_ms([r.tpot_s for r in done]),
            "e2e_ms": percentiles_ms([r.e2e_s for r in done]),
            "slo_attainment": round(len(met) / len(self.results), 4),
            "goodput_requests_per_s": round(len(met) / span_s, 3),
            "send_lag_ms": {"max": round(max(r.lag_s for r in self.results) * 1000, 3)},
        }


def _meets(result: RequestResult, slo_ttft_ms: float, slo_tpot_ms: float) -> bool:
    ttft, tpot = result.ttft_s, result.tpot_s
    return ttft is not None and ttft * 1000 <= slo_ttft_ms and (tpot is None or tpot * 1000 <= slo_tpot_ms)


def _rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def build_report(
    config: ServeBenchConfig,
    workload: WorkloadSpec,
    started: datetime,
    target: Target,
    runs: list[ServeRun],
    warmup_s: float,
) -> dict:
    summaries = [run.summary(config.slo_ttft_ms, config.slo_tpot_ms) for run in runs]
    mesh = config.private_mesh
    return {
        "benchmark": "serve",
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "machine": _machine(mesh),
        "setup": {
            "target": config.router if mesh is None else "private mesh",
            # router: through the router; shard: straight to this shard, adapter records attached
            "path": "router" if target.shard is None else "shard",
            "shard": target.shard,
            "private_mesh": None
            if mesh is None
            else {**asdict(mesh), "model_dir": str(mesh.model_dir), "redis_url": mesh.redis_url or "private"},
            "workload": {
                **asdict(workload),
                "rate": None,
                "prompt_set": "2 x rate's position (adapters), + 1 (base)",
                "num_adapters": len(target.adapter_names),
            },
            "rates": [_rate_label(rate) for rate in config.rates],
            "slo": {"ttft_ms": config.slo_ttft_ms, "tpot_ms": config.slo_tpot_ms},
            "warmup": config.warmup,
            "warmup_s": round(warmup_s, 2),
            "order": "per rate, adapters then base, and base then adapters at the next rate",
        },
        "runs": summaries,
        "adapters/base": _ratios(summaries),
        "definitions": DEFINITIONS,
    }


def _machine(mesh: PrivateMesh | None) -> dict:
    """This machine, and the device its private mesh's shards ran on; a running mesh's shards may be
    anywhere, so their device reads "mesh" (the file is then serve-mesh-<date>)."""
    if mesh is None:
        return {**machine_info("cpu"), "device": "mesh"}
    args = list(mesh.shard_args)
    return machine_info(args[args.index("--device") + 1] if "--device" in args[:-1] else "cpu")


def _ratios(summaries: list[dict]) -> dict:
    """Per rate: output tok/s, TTFT p50 and TPOT p50 of the adapters run over the base run's."""
    by_rate: dict = {}
    for summary in summaries:
        by_rate.setdefault(str(summary["rate"]), {})[summary["system"]] = summary
    ratios = {}
    for rate, pair in by_rate.items():
        if set(pair) != {"adapters", "base"}:
            continue
        adapters, base = pair["adapters"], pair["base"]
        ratios[rate] = {
            "output_tok_s": _ratio(adapters["output_tok_s"], base["output_tok_s"]),
            "ttft_p50": _ratio(_p50(adapters["ttft_ms"]), _p50(base["ttft_ms"])),
            "tpot_p50": _ratio(_p50(adapters["tpot_ms"]), _p50(base["tpot_ms"])),
        }
    return ratios


def _p50(percentiles: dict | None) -> float | None:
    return None if percentiles is None else percentiles["p50"]


def _ratio(value: float | None, baseline: float | None) -> float | None:
    return None if value is None or not baseline else round(value / baseline, 3)


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    direct = "-direct" if report["setup"]["path"] == "shard" else ""
    stem = output_dir / f"serve-{report['machine']['device'].split(':')[0]}-{report['date']}{direct}"
    return write_json_and_png(report, stem, plot_report)


def plot_report(report: dict, path: Path) -> None:
    """Output tokens/s, TTFT and TPOT against the offered rate, adapters and base side by side."""
    plt = pyplot()
    rates = [str(rate) for rate in report["setup"]["rates"]]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    panels = (
        ("output tokens/s", lambda s: s["output_tok_s"]),
        ("TTFT ms, log scale (p50 bar, p99 tick)", lambda s: _p50(s["ttft_ms"])),
        ("TPOT ms (p50 bar, p99 tick)", lambda s: _p50(s["tpot_ms"])),
    )
    p99s = (None, "ttft_ms", "tpot_ms")
    width = 0.38
    for axis, (title, value), p99_key in zip(axes, panels, p99s, strict=True):
        for offset, system in ((-width / 2, "base"), (width / 2, "adapters")):
            runs = {str(s["rate"]): s for s in report["runs"] if s["system"] == system}
            xs = [i + offset for i, rate in enumerate(rates) if rate in runs]
            ys = [value(runs[rate]) or 0 for rate in rates if rate in runs]
            axis.bar(xs, ys, width, label=system)
            if p99_key is not None:
                tops = [(runs[rate][p99_key] or {}).get("p99", 0) for rate in rates if rate in runs]
                axis.scatter(xs, tops, marker="_", s=200, color="black")
        axis.set_xticks(range(len(rates)), rates)
        axis.set_xlabel("offered requests/s")
        axis.set_title(title)
    axes[1].set_yscale("log")  # queueing past saturation takes TTFT from ~0.5 s to tens of seconds
    axes[0].legend()
    workload = report["setup"]["workload"]
    figure.suptitle(
        f"loraplex bench serve, {report['date']}: {workload['num_adapters']} adapters ({workload['mix']}), "
        f"{workload['num_requests']} requests of {workload['input_len']}+{workload['output_len']} tokens per run"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def summary_table(report: dict) -> str:
    def ms(value: dict | None, quantile: str) -> str:
        return "-" if value is None else f"{value[quantile]:.0f}"

    lines = [
        "| rate | system | done | req/s | out tok/s | TTFT p50/p99 ms | TPOT p50/p99 ms | SLO | errors |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in report["runs"]:
        ttft, tpot = s["ttft_ms"], s["tpot_ms"]
        lines.append(
            f"| {s['rate']} | {s['system']} | {s['completed']}/{s['num_requests']} | {s['requests_per_s']} "
            f"| {s['output_tok_s']} | {ms(ttft, 'p50')}/{ms(ttft, 'p99')} | {ms(tpot, 'p50')}/{ms(tpot, 'p99')} "
            f"| {s['slo_attainment']:.0%} | {s['errors'] or '-'} |"
        )
    for rate, ratio in report["adapters/base"].items():
        lines.append(
            f"rate {rate}: adapters/base output tok/s {ratio['output_tok_s']}, "
            f"TTFT p50 {ratio['ttft_p50']}, TPOT p50 {ratio['tpot_p50']}"
        )
    return "\n".join(lines)
