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
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from loraplex.registry.adapter_source import WEIGHTS_FILE
from loraplex.shard.adapter_store import AdapterStore, DiskCache
from loraplex.shard.engine import Engine, EngineConfig, EngineOutput, EngineRequest
from loraplex.shard.outputs import RequestFailed
from loraplex.shard.sampling import SamplingParams
from loraplex.tools.bench_adapters_report import TierLatencies, build_report, write_report
from loraplex.tools.bench_engine import build_workload, hf_generate
from loraplex.tools.bench_report import RequestTiming, SystemRun
from loraplex.tools.synthetic_adapters import write_peft_adapter

log = logging.getLogger("loraplex.bench")


@dataclass(frozen=True)
class AdapterBenchConfig:
    model_dir: Path
    device: str = "cpu"
    adapter_counts: tuple[int, ...] = (1, 10, 100, 1000)
    zipf_alpha: float = 1.0
    num_requests: int = 128  # per level
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
            ),
        )
        prompts = build_workload(engine.prompts.encode_text, config.num_requests)
        rng = np.random.default_rng(config.seed)
        levels = {
            n: zipf_adapters(rng, n, config.num_requests, config.zipf_alpha) for n in config.adapter_counts
        }
        sources = write_adapters(config, work_dir / "sources", levels)
        latencies = TierLatencies()
        runs, tiers = asyncio.run(
            _run_engine_levels(config, engine, prompts, levels, sources, work_dir, latencies)
        )
        latencies.add_slots(engine.slots.counters)
        del engine  # free its KV cache before transformers loads its own copy of the weights
        if not config.skip_baselines and config.baseline_adapters in levels:
            choices = levels[config.baseline_adapters][: config.baseline_requests]
            runs.append(run_peft_baseline(config, prompts, choices, sources[config.baseline_adapters]))
        report = build_report(config, started, prompts, levels, runs, tiers, latencies)
        json_path, png_path = write_report(report, config.output_dir)
        return AdapterBenchResult(report, json_path, png_path)
    finally:
        if config.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)


def zipf_adapters(rng: np.random.Generator, num_adapters: int, num_requests: int, alpha: float) -> list[int]:
    """Each request's adapter: index i (0 = most popular) with probability proportional to 1/(i+1)^alpha."""
    weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** alpha
    return rng.choice(num_adapters, size=num_requests, p=weights / weights.sum()).tolist()


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


async def _run_engine_levels(
    config: AdapterBenchConfig,
    engine: Engine,
    prompts: list[list[int]],
    levels: dict[int, list[int]],
    sources: dict[int, dict[int, Path]],
    work_dir: Path,
    latencies: TierLatencies,
) -> tuple[list[SystemRun], dict[str, dict]]:
    params = SamplingParams(max_new_tokens=config.max_new_tokens, ignore_eos=True)
    engine.start()
    try:
        warmup = [BenchRequest(prompts[0], None)]
        await run_closed_loop(
            engine, None, {}, warmup, 1, SamplingParams(max_new_tokens=4, ignore_eos=True), "w"
        )
        base = [BenchRequest(prompt, None) for prompt in prompts]
        runs = [await run_closed_loop(engine, None, {}, base, config.concurrency, params, "base_only")]
        tiers = {}
        for num_adapters, choices in levels.items():
            name = f"adapters_{num_adapters}"
            disk = DiskCache(work_dir / f"disk-cache-{num_adapters}", max_bytes=10 << 30)
            store = AdapterStore(
                lambda source, adapter, version: engine.load_adapter(source, adapter, version),
                config.max_cpu_adapters,
                disk,
                on_evict=lambda adapter: engine.drop_adapter(adapter.uid),
            )
            requests = [BenchRequest(prompt, index) for prompt, index in zip(prompts, choices, strict=True)]
            slots_before = (engine.slots.counters.hits, engine.slots.counters.misses)
            runs.append(
                await run_closed_loop(
                    engine, store, sources[num_adapters], requests, config.concurrency, params, name
                )
            )
            tiers[name] = {
                "distinct_adapters_used": len(set(choices)),
                "cpu": {"hits": store.counters.hits, "misses": store.counters.misses},
                "disk": {"hits": disk.counters.hits, "misses": disk.counters.misses},
                "slots": {
                    "hits": engine.slots.counters.hits - slots_before[0],
                    "misses": engine.slots.counters.misses - slots_before[1],
                },
            }
            latencies.add_store(store.counters, disk.counters)
            log.info("%s: %.1f tok/s", name, runs[-1].throughput_tok_s)
        return runs, tiers
    finally:
        engine.stop()


async def run_closed_loop(
    engine: Engine,
    store: AdapterStore | None,
    sources: dict[int, Path],
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
    checksums = {index: _checksum(path) for index, path in sources.items()}

    async def worker() -> None:
        for index in pending:
            request, timing = requests[index], timings[index]
            timing.submitted = time.perf_counter()
            adapter = None
            if request.adapter is not None:
                assert store is not None
                source = str(sources[request.adapter])
                adapter = await store.acquire(source, f"a{request.adapter}", 1, checksums[request.adapter])
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
    each. Every adapter the requests use is loaded up front, so the timing holds no loading."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    base = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    used = sorted(set(choices))
    model = PeftModel.from_pretrained(base, sources[used[0]], adapter_name=f"a{used[0]}")
    for index in used[1:]:
        model.load_adapter(sources[index], adapter_name=f"a{index}")
    model = model.to(config.device).eval()
    model.set_adapter(f"a{used[0]}")
    hf_generate(model, prompts[:1], 4, pad_id, config.device)  # warm-up
    wall_s, timings = 0.0, []
    for prompt, index in zip(prompts, choices, strict=False):
        model.set_adapter(f"a{index}")
        seconds, (timing,) = hf_generate(model, [prompt], config.max_new_tokens, pad_id, config.device)
        wall_s += seconds
        timings.append(timing)
    return SystemRun(f"peft_{config.baseline_adapters}", "hf", 1, wall_s, timings)
