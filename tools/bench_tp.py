"""`loraplex bench tp`: what tensor parallelism does to one shard, against TP=1 in the same run.

For each size N it records every rank's weight and KV-cache bytes (the weights should be ~1/N of
TP=1's) and times the same greedy batch (the base model and synthetic adapters mixed) on TP=1 and on
TP=N, taking turns round by round so that drift on a shared machine hits both alike; it also checks
that TP=N produced TP=1's tokens. On one machine's CPU cores the ranks share the cores, so the time
shows the cost of splitting (messages and all-reduces), not the speed-up of more devices; that needs
several GPUs.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.tools.report_files import pyplot, write_json_and_png

if TYPE_CHECKING:
    from loraplex.shard.engine import Engine

# torch and the engine are imported where the bench runs: the CLI imports this module for its flags,
# and every `loraplex` command would otherwise pay seconds of imports

log = logging.getLogger("loraplex.bench")


@dataclass(frozen=True)
class TPBenchConfig:
    model_dir: Path
    tp_sizes: tuple[int, ...] = (3,)  # compared with TP=1 each
    device: str = "cpu"
    batch_size: int = 8  # requests per batch; every other one uses an adapter
    num_adapters: int = 4
    adapter_rank: int = 16
    prompt_tokens: int = 64
    max_new_tokens: int = 32
    rounds: int = 3
    kv_cache_bytes: int = 256 << 20
    output_dir: Path = Path("bench/results")


def run_tp_bench(config: TPBenchConfig) -> tuple[dict, Path, Path]:
    from loraplex.tools.synthetic_adapters import write_peft_adapter

    with tempfile.TemporaryDirectory(prefix="loraplex-bench-tp-") as work:
        sources = [
            write_peft_adapter(
                Path(work) / f"a{i}", config.model_dir, rank=config.adapter_rank, targets=_TARGETS, seed=i
            )
            for i in range(config.num_adapters)
        ]
        baseline = _engine(config, 1)
        try:
            tp1 = _memory(baseline)
            runs = [_compare(config, baseline, size, sources) for size in config.tp_sizes]
        finally:
            baseline.stop()
    report = {
        "benchmark": "tp",
        "date": datetime.now().isoformat(timespec="seconds"),
        "model": config.model_dir.name,
        "device": config.device,
        "batch_size": config.batch_size,
        "prompt_tokens": config.prompt_tokens,
        "max_new_tokens": config.max_new_tokens,
        "rounds": config.rounds,
        "warmup_rounds": 1,  # run and not timed, before the rounds
        "tp1": tp1,
        "sizes": runs,
    }
    device = config.device.split(":")[0]
    stem = config.output_dir / f"tp-{config.model_dir.name}-{device}-{datetime.now():%Y-%m-%d}"
    json_path, png_path = write_json_and_png(report, stem, _plot)
    return report, json_path, png_path


_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _engine(config: TPBenchConfig, tp: int) -> Engine:
    from loraplex.shard.engine import Engine, EngineConfig

    return Engine(
        config.model_dir,
        EngineConfig(
            device=config.device,
            kv_cache_bytes=config.kv_cache_bytes,
            max_gpu_adapters=config.num_adapters,
            tp_size=tp,
            enable_prefix_caching=False,  # every round recomputes its prompts
        ),
    )


def _memory(engine: Engine) -> dict:
    return {
        "weight_bytes_per_rank": [rank.weight_bytes for rank in engine.rank_memory],
        "kv_cache_bytes_per_rank": [rank.kv_cache_bytes for rank in engine.rank_memory],
        "kv_blocks": engine.blocks.num_blocks,
    }


def _compare(config: TPBenchConfig, baseline: Engine, size: int, sources: list[Path]) -> dict:
    engine = _engine(config, size)
    try:
        memory = _memory(engine)
        # by engine, not by size: a size of 1 is a second TP=1 engine, compared with the first
        times: tuple[list[float], list[float]] = ([], [])
        outputs: list[list[list[int]]] = [[], []]
        for round_ in range(config.rounds + 1):  # round 0 warms both engines up and is not counted
            for which, (tp, timed) in enumerate(((1, baseline), (size, engine))):
                seconds, tokens = _timed_batch(config, timed, sources, round_)
                outputs[which] = tokens
                if round_:
                    times[which].append(seconds)
                log.info("round %d%s TP=%d: %.2f s", round_, "" if round_ else " (warm-up)", tp, seconds)
    finally:
        engine.stop()
    new_tokens = config.batch_size * config.max_new_tokens
    tp1_median, tpn_median = statistics.median(times[0]), statistics.median(times[1])
    tp1_weights = baseline.rank_memory[0].weight_bytes
    return {
        "tp": size,
        **memory,
        "weight_fraction_of_tp1_per_rank": [b / tp1_weights for b in memory["weight_bytes_per_rank"]],
        "seconds_tp1": times[0],
        "seconds_tp": times[1],
        "tokens_per_s_tp1": new_tokens / tp1_median,
        "tokens_per_s_tp": new_tokens / tpn_median,
        "throughput_ratio_vs_tp1": tp1_median / tpn_median,
        "tokens_match_tp1": outputs[1] == outputs[0],
    }


def _timed_batch(
    config: TPBenchConfig, engine: Engine, sources: list[Path], round_: int
) -> tuple[float, list[list[int]]]:
    """One batch (adapters loaded fresh, so both engines pay the same slot loads); wall seconds and
    the greedy tokens."""
    import torch

    from loraplex.shard.engine import EngineRequest
    from loraplex.shard.outputs import TokenOutput
    from loraplex.shard.sampling import SamplingParams

    adapters = [engine.load_adapter(str(source), f"a{i}", round_ + 1) for i, source in enumerate(sources)]
    params = SamplingParams(max_new_tokens=config.max_new_tokens, ignore_eos=True)
    requests = [
        EngineRequest(
            f"r{i}",
            [(7 * i + j) % 4000 + 100 for j in range(config.prompt_tokens)],
            params,
            adapter=adapters[i // 2 % len(adapters)] if i % 2 else None,
        )
        for i in range(config.batch_size)
    ]
    torch.set_num_threads(engine.cpu_threads)  # threads are per process; TP=1 gets every core
    started = time.perf_counter()
    outputs = engine.generate(requests)
    seconds = time.perf_counter() - started
    tokens = []
    for request in requests:
        produced = outputs[request.request_id]
        assert all(isinstance(output, TokenOutput) for output in produced), produced
        tokens.append([output.token.token_id for output in produced])  # type: ignore[union-attr]
    return seconds, tokens


def _plot(report: dict, path: Path) -> None:
    plt = pyplot()
    figure, (weights_axis, speed_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    mib = 2**20
    sizes = [1] + [run["tp"] for run in report["sizes"]]
    per_rank = [max(report["tp1"]["weight_bytes_per_rank"]) / mib] + [
        max(run["weight_bytes_per_rank"]) / mib for run in report["sizes"]
    ]
    weights_axis.bar([f"TP={n}" for n in sizes], per_rank, color="tab:blue")
    for x, (n, value) in enumerate(zip(sizes, per_rank, strict=True)):
        weights_axis.text(
            x,
            value,
            f"{value:.0f} MiB\n({value / per_rank[0]:.2f}x, 1/N={1 / n:.2f})",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    weights_axis.set_ylabel("weights per rank (MiB)")
    weights_axis.set_title(f"{report['model']}: weights on the largest rank")
    weights_axis.set_ylim(0, per_rank[0] * 1.3)
    speeds = [report["sizes"][0]["tokens_per_s_tp1"]] + [run["tokens_per_s_tp"] for run in report["sizes"]]
    speed_axis.bar([f"TP={n}" for n in sizes], speeds, color="tab:orange")
    speed_axis.set_ylabel("output tokens/s (median of rounds)")
    speed_axis.set_title(
        f"batch of {report['batch_size']} on {report['device']} (ranks share the cores)", fontsize=10
    )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def summary_table(report: dict) -> str:
    mib = 2**20
    lines = [
        f"{'TP':>3} {'weights/rank MiB':>17} {'x TP=1':>7} {'tok/s':>7} {'x TP=1':>7} {'same tokens':>11}"
    ]
    tp1_weights = max(report["tp1"]["weight_bytes_per_rank"])
    tp1_speed = (
        statistics.median(run["tokens_per_s_tp1"] for run in report["sizes"]) if report["sizes"] else 0.0
    )
    lines.append(f"{1:>3} {tp1_weights / mib:>17.1f} {1.0:>7.2f} {tp1_speed:>7.1f} {1.0:>7.2f} {'':>11}")
    for run in report["sizes"]:
        heaviest = max(run["weight_bytes_per_rank"])
        lines.append(
            f"{run['tp']:>3} {heaviest / mib:>17.1f} {heaviest / tp1_weights:>7.3f} "
            f"{run['tokens_per_s_tp']:>7.1f} {run['throughput_ratio_vs_tp1']:>7.2f} {run['tokens_match_tp1']!s:>11}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, add_model_options) -> None:
    add_model_options(parser)
    parser.add_argument(
        "--tp-sizes",
        default="3",
        help="tensor-parallel sizes to compare with TP=1, comma-separated (they must divide the heads)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, after one warm-up round")


def run_from_args(args: argparse.Namespace) -> int:
    from loraplex.tools.model_store import resolve_model

    config = TPBenchConfig(
        model_dir=resolve_model(args.model, args.cache_dir),
        tp_sizes=tuple(int(size) for size in args.tp_sizes.split(",")),
        device=args.device,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        rounds=args.rounds,
        kv_cache_bytes=args.kv_cache_bytes or TPBenchConfig.kv_cache_bytes,
        output_dir=args.output_dir,
    )
    report, json_path, png_path = run_tp_bench(config)
    print(summary_table(report))
    print(f"wrote {json_path} and {png_path}")
    return 0
