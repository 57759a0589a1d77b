"""`loraplex bench engine`: our engine against transformers on the same weights, in one process and run.

The engine runs closed-loop at each concurrency level (a new request is submitted as soon as one
finishes); the baselines are `generate` one request at a time and static batches. Every system produces
exactly `max_new_tokens` per request (EOS ignored), so tokens per second compare like for like, and the
ratios are taken within the run because the machine is shared and noisy.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor

from loraplex.shard.engine import Engine, EngineConfig, EngineOutput, EngineRequest
from loraplex.shard.outputs import RequestFailed
from loraplex.shard.sampling import SamplingParams
from loraplex.shard.weights import model_dtype
from loraplex.tools.bench_report import RequestTiming, SystemRun, build_report, write_report

log = logging.getLogger("loraplex.bench")

# Varied on purpose: short and long questions give the mixed prompt lengths that batching must handle.
QUESTIONS = (
    "What is the capital of France?",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "Write a haiku about autumn leaves.",
    "List three advantages of learning a second language, and explain each one briefly.",
    "What is 17 times 23?",
    "Summarise the plot of Romeo and Juliet in a few sentences for a twelve-year-old reader.",
    "Why is the sky blue?",
    "Give me a recipe for a quick vegetarian pasta dinner that takes less than thirty minutes, "
    "including a shopping list and the steps in order.",
    "Translate 'good morning, how are you?' into Spanish.",
    "What are the main differences between a virus and a bacterium?",
    "Suggest a name for a small bakery.",
    "Describe the water cycle, from evaporation over the ocean to rain falling on a mountain and "
    "flowing back to the sea through rivers.",
    "How do I reverse a list in Python?",
    "What should I pack for a weekend hiking trip in the mountains?",
    "Who wrote 'Pride and Prejudice'?",
    "Explain what a neural network is to someone who has never programmed a computer, using an analogy.",
)


@dataclass(frozen=True)
class BenchConfig:
    model_dir: Path
    device: str = "cpu"
    concurrency: tuple[int, ...] = (1, 8, 32)
    num_requests: int = 32  # per engine concurrency level, and for the static-batching baseline
    max_new_tokens: int = 64
    baseline_requests: int = 8  # for `generate` one at a time, which is slow
    static_batch_size: int = 8
    output_dir: Path = Path("bench/results")
    kv_cache_bytes: int = 0
    max_batch_tokens: int = 0
    skip_baselines: bool = False
    # Also run the top level with prefix caching off: the chat template's shared system prompt is a
    # real saving, and the report should show how much of the gain it is.
    compare_prefix_caching: bool = True


@dataclass(frozen=True)
class BenchResult:
    report: dict
    json_path: Path
    png_path: Path


def run_bench(config: BenchConfig) -> BenchResult:
    """Run every system on the same workload and write the JSON report and PNG plot."""
    started = datetime.now().astimezone()
    engine = _engine(config, enable_prefix_caching=True)
    prompts = build_workload(engine.prompts.encode_text, config.num_requests)
    runs = run_engine_levels(engine, prompts, config.concurrency, config.max_new_tokens)
    del engine  # free its KV cache before the next system loads its own copy of the weights
    if config.compare_prefix_caching:
        engine = _engine(config, enable_prefix_caching=False)
        top = (max(config.concurrency),)
        runs += run_engine_levels(engine, prompts, top, config.max_new_tokens, "_no_prefix_cache")
        del engine
    if not config.skip_baselines:
        runs += run_hf_baselines(config, prompts)
    report = build_report(config, started, prompts, runs)
    json_path, png_path = write_report(report, config.output_dir)
    return BenchResult(report, json_path, png_path)


def _engine(config: BenchConfig, enable_prefix_caching: bool) -> Engine:
    return Engine(
        config.model_dir,
        EngineConfig(
            device=config.device,
            kv_cache_bytes=config.kv_cache_bytes,
            max_batch_tokens=config.max_batch_tokens,
            enable_prefix_caching=enable_prefix_caching,
        ),
    )


def build_workload(encode, num_requests: int) -> list[list[int]]:
    """num_requests chat prompts, cycling through QUESTIONS; encode is PromptEncoder.encode_text."""
    return [encode(QUESTIONS[i % len(QUESTIONS)], apply_chat_template=True) for i in range(num_requests)]


# --- our engine ------------------------------------------------------------------------------------


def run_engine_levels(
    engine: Engine, prompts: list[list[int]], levels: tuple[int, ...], max_new_tokens: int, suffix: str = ""
) -> list[SystemRun]:
    """One started engine for every level, warmed up by one short request first."""
    engine.start()
    try:
        run_closed_loop(engine, prompts[:1], 1, SamplingParams(max_new_tokens=4, ignore_eos=True), "warmup")
        params = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
        runs = []
        for concurrency in levels:
            name = f"engine_c{concurrency}{suffix}"
            runs.append(run_closed_loop(engine, prompts, concurrency, params, name))
            log.info("%s: %.1f tok/s", runs[-1].name, runs[-1].throughput_tok_s)
        return runs
    finally:
        engine.stop()


def run_closed_loop(
    engine: Engine, prompts: list[list[int]], concurrency: int, params: SamplingParams, name: str
) -> SystemRun:
    """Keep `concurrency` requests in flight until every prompt is done."""
    loop = _ClosedLoop(engine, prompts, params, name)
    start = time.perf_counter()
    loop.run(concurrency)
    wall_s = time.perf_counter() - start
    if loop.failures:
        raise RuntimeError(f"{name}: {len(loop.failures)} requests failed, first: {loop.failures[0].message}")
    return SystemRun(name, "engine", concurrency, wall_s, loop.timings)


class _ClosedLoop:
    """Submits the next prompt from the callback of the request that just finished (on the engine
    thread), so a freed slot is refilled at the very next step, with no hop through this thread."""

    def __init__(self, engine: Engine, prompts: list[list[int]], params: SamplingParams, name: str) -> None:
        self.engine, self.prompts, self.params, self.name = engine, prompts, params, name
        self.timings = [RequestTiming() for _ in prompts]
        self.failures: list[RequestFailed] = []
        self._done = threading.Condition()
        self._num_submitted = 0
        self._num_finished = 0

    def run(self, concurrency: int) -> None:
        with self._done:
            for _ in range(min(concurrency, len(self.prompts))):
                self._submit_next()
            self._done.wait_for(lambda: self._num_finished == len(self.prompts))

    def _submit_next(self) -> None:  # with _done held
        index = self._num_submitted
        if index == len(self.prompts):
            return
        self._num_submitted += 1
        self.timings[index].submitted = time.perf_counter()
        request = EngineRequest(f"{self.name}-{index}", self.prompts[index], self.params)
        self.engine.submit(request, lambda output: self._on_output(index, output))

    def _on_output(self, index: int, output: EngineOutput) -> None:
        now = time.perf_counter()
        timing = self.timings[index]
        if isinstance(output, RequestFailed):
            self.failures.append(output)
        else:
            timing.first_token = timing.first_token or now
            timing.num_tokens = output.num_generated
            if output.finish_reason is None:
                return
        timing.finished = now
        with self._done:
            self._num_finished += 1
            self._submit_next()
            self._done.notify()


# --- transformers baselines ------------------------------------------------------------------------


class _FirstCallTimer(LogitsProcessor):
    """A logits processor that notes when the first logits exist (prefill done): TTFT for `generate`."""

    def __init__(self) -> None:
        self.first: float | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.first is None:
            if scores.is_cuda:
                torch.cuda.synchronize(scores.device)
            self.first = time.perf_counter()
        return scores


def baseline_dtype(device: str) -> torch.dtype:
    """The dtype transformers' baselines load the weights in: the engine's on that device (fp32 on CPU,
    bf16 on GPUs), so that a comparison on a GPU is not bf16 against fp32."""
    return model_dtype(torch.device(device))


def run_hf_baselines(config: BenchConfig, prompts: list[list[int]]) -> list[SystemRun]:
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    dtype = baseline_dtype(config.device)
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=dtype).to(config.device).eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    n = config.max_new_tokens
    hf_generate(model, prompts[:1], min(n, 4), pad_id, config.device)  # warm-up
    sequential = [
        hf_generate(model, [prompt], n, pad_id, config.device)
        for prompt in prompts[: config.baseline_requests]
    ]
    size = config.static_batch_size
    static = [
        hf_generate(model, prompts[i : i + size], n, pad_id, config.device)
        for i in range(0, len(prompts), size)
    ]
    return [_as_run("hf_sequential", 1, sequential), _as_run(f"hf_static_{size}", size, static)]


def hf_generate(
    model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, device: str
) -> tuple[float, list[RequestTiming]]:
    """One left-padded batch through `generate`, greedy, exactly max_new_tokens each; returns the wall
    time and per-request timings measured from the batch start."""
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)  # [B, S]
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    timer = _FirstCallTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            logits_processor=[timer],
        )
    if output.is_cuda:
        torch.cuda.synchronize(output.device)
    finished = time.perf_counter()
    num_tokens = output.shape[1] - width
    timing = RequestTiming(start, timer.first, finished, num_tokens)
    return finished - start, [timing] * len(prompts)  # the batch's requests share one timing


def _as_run(name: str, batch_size: int, batches: list[tuple[float, list[RequestTiming]]]) -> SystemRun:
    wall_s = sum(wall for wall, _ in batches)
    return SystemRun(name, "hf", batch_size, wall_s, [t for _, timings in batches for t in timings])
