"""`loraplex bench adapters`: many adapters in one batch against the base model alone and against
transformers + peft switching adapters per request, in one process and run.

Each level draws every request's adapter from a power law (Zipf, exponent `zipf_alpha`) over n
adapters, so a few are hot and most are cold, as with one adapter per customer. Requests go through
the shard's real tiers: the CPU tier with its disk cache (`AdapterStore`, fresh per level, so each
adapter's first use is a cold load from its source) and the engine's slots, then the engine in a
closed loop. The base-only level runs the same prompts on the same engine with no adapter. Every
system produces exactly `max_new_tokens` per request (EOS ignored), and ratios are taken within the
run because the machine is shared and noisy.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from loraplex.registry.adapter_config import WEIGHTS_FILE
from loraplex.shard.adapter_store import AdapterStore, DiskCache
from loraplex.shard.engine import Engine, EngineConfig, EngineOutput, EngineRequest
from loraplex.shard.outputs import RequestFailed
from loraplex.shard.sampling import SamplingParams
from loraplex.tools.bench_adapters_report import TierLatencies, build_report, write_report
from loraplex.tools.bench_engine import baseline_dtype, build_workload, hf_generate
from loraplex.tools.bench_report import RequestTiming, SystemRun
from loraplex.tools.synthetic_adapters import write_peft_adapter
from loraplex.tools.workload import adapter_choices

log = logging.getLogger("loraplex.bench")


@dataclass(frozen=True)
class AdapterBenchConfig:
    model_dir: Path
    device: str = "cpu"
    adapter_counts: tuple[int, ...] = (1, 10, 100, 1000)
    zipf_alpha: float = 1.0
    num_requests: int = 192  # per level, split over the rounds
    rounds: int = 3  # base-only and every level take turns, round by round
    pairs: int = 3  # back-to-back base/level batch pairs per level (paired_batch_ratios)
    paired_new_tokens: int = 24
    concurrency: int = 32
    max_new_tokens: int = 64
    # Adapter shape: ranks cycle over the adapters; the targets are every attention projection,
    # a common choice that costs more than PEFT's q/v default.
    ranks: tuple[int, ...] = (8, 16)
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    max_gpu_adapters: int = 32
    max_cpu_adapters: int = 64
    baseline_adapters: int = 100  # the level whose workload the peft baseline replays
    baseline_requests: int = 8  # transformers + peft, one request at a time, is slow
    output_dir: Path = Path("bench/results")
    work_dir: Path | None = None  # adapter sources and disk cache; default: a temporary directory
    kv_cache_bytes: int = 0
    # Off by default: base-only requests would share the chat template's K/V across every request,
    # adapter requests only within one adapter, and on a CPU, where each prompt row costs as much as a
    # decode row, that difference would swamp the cost of batching adapters this measures.
    prefix_caching: bool = False
    skip_baselines: bool = False
    seed: int = 0


@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    adapter: int | None  # index into the level's adapters; None: the base model


@dataclass(frozen=True)
class AdapterBenchResult:
    report: dict
    json_path: Path
    png_path: Path


def run_adapter_bench(config: AdapterBenchConfig) -> AdapterBenchResult:
    """Run base-only, every adapter level and the peft baseline; write the JSON report and PNG plot."""
    started = datetime.now().astimezone()
    work_dir = config.work_dir or Path(tempfile.mkdtemp(prefix="loraplex-bench-adapters-"))
    try:
        engine = Engine(
            config.model_dir,
            EngineConfig(
                device=config.device,
                kv_cache_bytes=config.kv_cache_bytes,
                max_gpu_adapters=config.max_gpu_adapters,
                max_lora_rank=max(config.ranks),
                enable_prefix_caching=config.prefix_caching,
            ),
        )
        prompts = build_workload(engine.prompts.encode_text, config.num_requests)
        rng = np.random.default_rng(config.seed)
        levels = {
            n: adapter_choices(rng, "zipf", n, config.num_requests, config.zipf_alpha)
            for n in config.adapter_counts
        }
        sources = write_adapters(config, work_dir / "sources", levels)
        latencies = TierLatencies()
        runs, tiers, round_ratios = asyncio.run(
            _run_engine_levels(config, engine, prompts, levels, sources, work_dir, latencies)
        )
        latencies.add_slots(engine.slots.counters)
        paired = paired_batch_ratios(config, engine, prompts, levels, sources)
        del engine  # free its KV cache before transformers loads its own copy of the weights
        if not config.skip_baselines and config.baseline_adapters in levels:
            choices = levels[config.baseline_adapters][: config.baseline_requests]
            runs.append(run_peft_baseline(config, prompts, choices, sources[config.baseline_adapters]))
        elif not config.skip_baselines:
            log.warning(
                "no peft baseline: it replays the %d-adapter level's requests; add %d to --adapter-counts",
                config.baseline_adapters,
                config.baseline_adapters,
            )
        report = build_report(config, started, prompts, levels, runs, tiers, latencies, round_ratios, paired)
        json_path, png_path = write_report(report, config.output_dir)
        return AdapterBenchResult(report, json_path, png_path)
    finally:
        if config.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def write_adapters(
    config: AdapterBenchConfig, directory: Path, levels: dict[int, list[int]]
) -> dict[int, dict]:
    """PEFT directories for the adapters each level uses (the rest of its n are never asked for, so
    never written): level -> adapter index -> path."""
    sources: dict[int, dict[int, Path]] = {}
    for num_adapters, choices in levels.items():
        sources[num_adapters] = {}
        for index in sorted(set(choices)):
            path = directory / f"n{num_adapters}-a{index}"
            write_peft_adapter(
                path,
                config.model_dir,
                rank=config.ranks[index % len(config.ranks)],
                alpha=16,
                targets=config.targets,
                seed=num_adapters * 100_003 + index,
                dtype=torch.bfloat16,
            )
            sources[num_adapters][index] = path
    return sources


# --- our engine ------------------------------------------------------------------------------------


@dataclass
class _Level:
    """One adapter count's tiers (kept across rounds: later rounds find the hot adapters warm)."""

    name: str
    choices: list[int]
    catalogue: dict[int, tuple[str, str]]  # adapter index -> (source, checksum), as the registry has it
    store: AdapterStore
    disk: DiskCache


async def _run_engine_levels(
    config: AdapterBenchConfig,
    engine: Engine,
    prompts: list[list[int]],
    levels: dict[int, list[int]],
    sources: dict[int, dict[int, Path]],
    work_dir: Path,
    latencies: TierLatencies,
) -> tuple[list[SystemRun], dict[str, dict], dict[str, list[float]]]:
    """Base-only and every level, interleaved round by round, so that a noisy spell on the machine hits
    all systems alike; each round's ratios compare runs minutes apart, not a whole benchmark apart."""
    params = SamplingParams(max_new_tokens=config.max_new_tokens, ignore_eos=True)
    state = [
        _Level(
            f"adapters_{n}",
            choices,
            {index: (str(path), _checksum(path)) for index, path in sources[n].items()},
            *_tiers(engine, config, work_dir / f"disk-cache-{n}"),
        )
        for n, choices in levels.items()
    ]
    slot_counts = {level.name: [0, 0] for level in state}
    rounds: dict[str, list[SystemRun]] = {"base_only": [], **{level.name: [] for level in state}}
    engine.start()
    try:
        warmup = [BenchRequest(prompts[0], None)]
        await run_closed_loop(
            engine, None, {}, warmup, 1, SamplingParams(max_new_tokens=4, ignore_eos=True), "w"
        )
        for part in _round_slices(len(prompts), config.rounds):
            base = [BenchRequest(prompt, None) for prompt in prompts[part]]
            rounds["base_only"].append(
                await run_closed_loop(engine, None, {}, base, config.concurrency, params, "base_only")
            )
            for level in state:
                requests = [
                    BenchRequest(p, i) for p, i in zip(prompts[part], level.choices[part], strict=True)
                ]
                hits, misses = engine.slots.counters.hits, engine.slots.counters.misses
                run = await run_closed_loop(
                    engine, level.store, level.catalogue, requests, config.concurrency, params, level.name
                )
                rounds[level.name].append(run)
                slot_counts[level.name][0] += engine.slots.counters.hits - hits
                slot_counts[level.name][1] += engine.slots.counters.misses - misses
                log.info("%s: %.1f tok/s", level.name, run.throughput_tok_s)
    finally:
        engine.stop()
    tiers = {}
    for level in state:
        latencies.add_store(level.store.counters, level.disk.counters)
        hits, misses = slot_counts[level.name]
        tiers[level.name] = {
            "distinct_adapters_used": len(set(level.choices)),
            "cpu": {"hits": level.store.counters.hits, "misses": level.store.counters.misses},
            "disk": {"hits": level.disk.counters.hits, "misses": level.disk.counters.misses},
            "slots": {"hits": hits, "misses": misses},
        }
    runs = [_merged(name, runs) for name, runs in rounds.items()]
    round_ratios = {
        f"{name}/base_only": [
            round(run.throughput_tok_s / base.throughput_tok_s, 3)
            for run, base in zip(runs_of_level, rounds["base_only"], strict=True)
        ]
        for name, runs_of_level in rounds.items()
        if name != "base_only"
    }
    return runs, tiers, round_ratios


def _tiers(engine: Engine, config: AdapterBenchConfig, disk_dir: Path) -> tuple[AdapterStore, DiskCache]:
    disk = DiskCache(disk_dir, max_bytes=10 << 30)
    store = AdapterStore(
        lambda source, adapter, version: engine.load_adapter(source, adapter, version),
        config.max_cpu_adapters,
        disk,
        on_evict=lambda adapter: engine.drop_adapter(adapter.uid),
    )
    return store, disk


def _round_slices(num_requests: int, rounds: int) -> list[slice]:
    bounds = [round(num_requests * r / rounds) for r in range(rounds + 1)]
    return [slice(start, end) for start, end in itertools.pairwise(bounds) if end > start]


def _merged(name: str, runs: list[SystemRun]) -> SystemRun:
    """One system's rounds as one run: all its requests, the sum of its wall times."""
    timings = [timing for run in runs for timing in run.timings]
    return SystemRun(name, "engine", runs[0].concurrency, sum(run.wall_s for run in runs), timings)


def paired_batch_ratios(
    config: AdapterBenchConfig,
    engine: Engine,
    prompts: list[list[int]],
    levels: dict[int, list[int]],
    sources: dict[int, dict[int, Path]],
) -> dict[str, list[float]]:
    """A second, steadier estimate of the cost of adapters: one batch of `concurrency` requests (the
    level's first draws) run to completion inline, against the same batch on the base model, in
    back-to-back pairs a few seconds long, so that the machine's slow drifts cancel within a pair.
    Returns each level's base/level time ratio per pair (throughput ratio, as the work is the same)."""
    params = SamplingParams(max_new_tokens=config.paired_new_tokens, ignore_eos=True)
    batch = prompts[: config.concurrency]
    base = [EngineRequest(f"pb-{i}", prompt, params) for i, prompt in enumerate(batch)]
    ratios: dict[str, list[float]] = {}
    for num_adapters, choices in levels.items():
        loaded = {
            index: engine.load_adapter(str(sources[num_adapters][index]), f"p{num_adapters}-a{index}", 1)
            for index in set(choices[: len(batch)])
        }
        adapted = [
            EngineRequest(f"pa-{i}", prompt, params, loaded[index])
            for i, (prompt, index) in enumerate(zip(batch, choices, strict=False))
        ]
        engine.generate(adapted)  # slots filled and packed outside the timed pairs
        ratios[f"adapters_{num_adapters}/base_only"] = []
        for _ in range(config.pairs):
            base_s, adapted_s = _timed_generate(engine, base), _timed_generate(engine, adapted)
            ratios[f"adapters_{num_adapters}/base_only"].append(round(base_s / adapted_s, 3))
    return ratios


def _timed_generate(engine: Engine, requests: list[EngineRequest]) -> float:
    started = time.perf_counter()
    engine.generate(requests)
    return time.perf_counter() - started


async def run_closed_loop(
    engine: Engine,
    store: AdapterStore | None,
    catalogue: dict[int, tuple[str, str]],
    requests: list[BenchRequest],
    concurrency: int,
    params: SamplingParams,
    name: str,
) -> SystemRun:
    """Keep `concurrency` requests in flight until all are done; each takes its adapter from the
    store (loading it through the tiers if cold) the way the shard service does, so cold loads show
    in that request's time to first token."""
    timings = [RequestTiming() for _ in requests]
    pending = iter(range(len(requests)))

    async def worker() -> None:
        for index in pending:
            request, timing = requests[index], timings[index]
            timing.submitted = time.perf_counter()
            adapter = None
            if request.adapter is not None:
                assert store is not None
                source, checksum = catalogue[request.adapter]
                adapter = await store.acquire(source, f"a{request.adapter}", 1, checksum)
            try:
                await _generate(
                    engine, EngineRequest(f"{name}-{index}", request.prompt, params, adapter), timing
                )
            finally:
                if adapter is not None:
                    store.release(adapter)  # type: ignore[union-attr]

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return SystemRun(name, "engine", concurrency, time.perf_counter() - start, timings)


async def _generate(engine: Engine, request: EngineRequest, timing: RequestTiming) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def on_output(output: EngineOutput) -> None:  # on the engine thread
        now = time.perf_counter()
        if isinstance(output, RequestFailed):
            loop.call_soon_threadsafe(_settle, done, RuntimeError(f"{request.request_id}: {output.message}"))
            return
        timing.first_token = timing.first_token or now
        timing.num_tokens = output.num_generated
        if output.finish_reason is not None:
            timing.finished = now
            loop.call_soon_threadsafe(_settle, done, None)

    engine.submit(request, on_output)
    await done


def _settle(future: asyncio.Future[None], error: Exception | None) -> None:
    if not future.done():
        future.set_exception(error) if error else future.set_result(None)


def _checksum(adapter_dir: Path) -> str:
    return hashlib.sha256((adapter_dir / WEIGHTS_FILE).read_bytes()).hexdigest()


# --- transformers + peft baseline ------------------------------------------------------------------


def run_peft_baseline(
    config: AdapterBenchConfig, prompts: list[list[int]], choices: list[int], sources: dict[int, Path]
) -> SystemRun:
    """transformers + peft serving one request at a time, switching to the request's adapter before
    each (the switch is timed with the request). Every adapter the requests use is loaded up front, so
    the timing holds no loading."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=baseline_dtype(config.device))
    used = sorted(set(choices))
    model = PeftModel.from_pretrained(base, sources[used[0]], adapter_name=f"a{used[0]}")
    for index in used[1:]:
        model.load_adapter(sources[index], adapter_name=f"a{index}")
    model = model.to(config.device).eval()
    model.set_adapter(f"a{used[0]}")
    hf_generate(model, prompts[:1], 4, pad_id, config.device)  # warm-up
    wall_s, timings = 0.0, []
    for prompt, index in zip(prompts, choices, strict=False):
        switched = time.perf_counter()  # the switch is part of serving the request, as our slot swap is
        model.set_adapter(f"a{index}")
        _, (timing,) = hf_generate(model, [prompt], config.max_new_tokens, pad_id, config.device)
        wall_s += timing.finished - switched
        timings.append(replace(timing, submitted=switched))
    return SystemRun(f"peft_{config.baseline_adapters}", "hf", 1, wall_s, timings)
