"""`loraplex bench kernels`: the Triton multi-LoRA kernels (shard/lora_kernels.py) checked against the
float32 torch reference and timed against the per-adapter loop of torch matmuls one writes without
SGMV, per projection shape, rank, number of distinct adapters, batch kind, popularity mix and dtype.

Each case builds real stacked slot buffers (A [N, R, in], B [N, out, R], zero-padded past each rank,
float32 scalings), a step whose tokens are grouped by slot as `ModelRunner.run` orders them, and its
metadata, built once outside the timed region as production builds it once per step. Then:
- correctness: shrink + expand against shrink_reference + expand_reference on the same device, within
  lora_ops.KERNEL_TOLERANCES (the kernel tests' own); a failing case is named in the JSON, exit status 1;
- speed: our two launches; the baseline, y[rows] += s * (x[rows] @ A_k^T) @ B_k^T for each adapter's
  contiguous rows in the operands' dtype; the dense projection x @ W^T alone, for LoRA's overhead.
On CUDA each is timed two ways (`CudaTimer`); on CPU the kernels run in Triton's interpreter, so the
times there measure the interpreter and the report says `"interpreted": true`.

On a GPU machine with a copy of the repository but no install (python3 with torch, triton, numpy and
matplotlib is enough), from the repository root:

    mkdir -p /tmp/pkg && ln -sfn "$PWD" /tmp/pkg/loraplex && \
        PYTHONPATH=/tmp/pkg TRITON_INTERPRET=0 python3 -m loraplex.tools.bench_kernels --device cuda

writes bench/results/kernels-cuda-<date>.json and .png (--output-dir elsewhere): 576 cases, estimated
at 2-3 minutes on an H100, most of it compiling the kernels and timing the 64-adapter loops. Adding
--quick runs the tiny grid on the GPU in seconds, a smoke test first. Installed, the command is
`loraplex bench kernels --device cuda`; `loraplex bench kernels` alone runs the tiny grid on CPU.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.tools.bench_kernels_report import (
    build_report,
    compare,
    machine_info,
    summary_table,
    write_report,
)
from loraplex.tools.bench_kernels_timers import CpuTimer, CudaTimer

if TYPE_CHECKING:
    import torch

# torch and the kernels are imported where the bench runs: the CLI imports this module for its flags

log = logging.getLogger("loraplex.bench")

DTYPES = ("bfloat16", "float16", "float32")  # those the kernels serve (lora_ops.KERNEL_TOLERANCES)
MIXES = ("identical", "uniform", "zipf")  # how the step's sequences spread over its adapters
LORA_ALPHA = 16.0  # scaling = alpha / r, as PEFT's, times a per-slot factor so slots differ


@dataclass(frozen=True)
class Projection:
    """A targeted projection in -> out, written at out_offset of a y_width-wide output (a fused one,
    as qkv's; y_width 0: y is the projection's own output)."""

    name: str
    in_features: int
    out_features: int
    y_width: int = 0
    out_offset: int = 0

    @property
    def width(self) -> int:
        return self.y_width or self.out_features


@dataclass(frozen=True)
class BatchKind:
    name: str
    sequence_tokens: tuple[int, ...]  # tokens each sequence brings to the step: 1 = a decode row


LLAMA3_8B = (
    Projection("q", 4096, 4096),
    Projection("kv", 4096, 1024, y_width=6144, out_offset=4096),  # k's slice of the fused qkv output
    Projection("gate_up", 4096, 14336),
    Projection("down", 14336, 4096),
)
GPU_BATCHES = (
    BatchKind("decode64", (1,) * 64),
    BatchKind("decode256", (1,) * 256),
    BatchKind("prefill", (512,) * 4),
    BatchKind("mixed", (512,) * 2 + (1,) * 62),
)
TINY = (  # two shrink K blocks, several expand N blocks, the last masked (as tests/test_lora_kernels.py)
    Projection("tiny_q", 72, 136),
    Projection("tiny_kv", 72, 40, y_width=216, out_offset=136),
)
TINY_BATCHES = (
    BatchKind("decode", (1,) * 6),
    BatchKind("prefill", (9,) * 2),
    BatchKind("mixed", (9,) + (1,) * 4),
)


@dataclass(frozen=True)
class KernelBenchConfig:
    """The default is the GPU grid (Llama-3-8B shapes); `quick` gives the tiny one."""

    device: str = "cuda"
    dtypes: tuple[str, ...] = ("bfloat16", "float16")
    projections: tuple[Projection, ...] = LLAMA3_8B
    rank_sets: tuple[tuple[int, ...], ...] = ((16,), (64,), (8, 16, 32, 64))  # ranks cycle over slots
    adapter_counts: tuple[int, ...] = (1, 4, 16, 64)  # distinct adapters in the step
    batches: tuple[BatchKind, ...] = GPU_BATCHES
    mixes: tuple[str, ...] = ("uniform", "zipf")  # for counts > 1; one adapter is "identical"
    num_slots: int = 64  # slots in the buffers (>= every adapter count); a step uses a random subset
    zipf_alpha: float = 1.0
    warmup: int = 5  # untimed calls before each timing (the correctness call compiled the kernels)
    reps: int = 50  # timed calls per system and way of timing; medians are reported
    time_base: bool = True  # also time x @ W^T, the projection LoRA rides on
    output_dir: Path = Path("bench/results")
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [d for d in self.dtypes if d not in DTYPES] + [m for m in self.mixes if m not in MIXES]
        if unknown:
            raise ValueError(f"unknown dtypes or mixes {unknown}: dtypes {list(DTYPES)}, mixes {MIXES}")
        if self.num_slots < max(self.adapter_counts):
            raise ValueError(
                f"{self.num_slots} slots cannot hold {max(self.adapter_counts)} distinct adapters"
            )
        if self.reps < 1 or self.warmup < 0 or min(r for ranks in self.rank_sets for r in ranks) < 1:
            raise ValueError("reps must be >= 1, warmup >= 0 and every rank >= 1")

    @classmethod
    def quick(cls, device: str = "cpu", **changes) -> KernelBenchConfig:
        """Tiny shapes that take seconds in Triton's interpreter."""
        tiny = {
            "projections": TINY,
            "rank_sets": ((4, 16),),
            "adapter_counts": (1, 3),
            "batches": TINY_BATCHES,
        }
        return cls(**{"device": device, "num_slots": 4, "warmup": 0, "reps": 3, **tiny, **changes})


@dataclass(frozen=True)
class Case:
    projection: Projection
    dtype: str
    ranks: tuple[int, ...]
    batch: BatchKind
    num_adapters: int
    mix: str

    @property
    def name(self) -> str:  # e.g. q/bfloat16/r8-16-32-64/decode64/zipf-16
        ranks = "r" + "-".join(map(str, self.ranks))
        return f"{self.projection.name}/{self.dtype}/{ranks}/{self.batch.name}/{self.mix}-{self.num_adapters}"


@dataclass(frozen=True)
class KernelBenchResult:
    report: dict
    json_path: Path
    png_path: Path

    @property
    def passed(self) -> bool:
        return not self.report["summary"]["failed"]


def run_kernel_bench(config: KernelBenchConfig) -> KernelBenchResult:
    """Every case of the grid: correctness, then timings; writes the JSON report and PNG plot."""
    import torch

    started = datetime.now().astimezone()
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: torch sees no CUDA device here")
    kernels, interpreted = load_kernels(device)
    if device.type == "cuda":
        timer = CudaTimer(device, config.warmup, config.reps)
        results = _run_grid(config, device, kernels, timer)
    else:
        timer = CpuTimer(config.reps)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny GEMMs run fastest on one thread, as the CPU LoRA path runs them
        try:
            results = _run_grid(config, device, kernels, timer)
        finally:
            torch.set_num_threads(threads)
    report = build_report(config, started, machine_info(device), interpreted, timer.method, results)
    json_path, png_path = write_report(report, config.output_dir)
    return KernelBenchResult(report, json_path, png_path)


def _run_grid(config: KernelBenchConfig, device: torch.device, kernels, timer) -> list[dict]:
    import torch

    results, base_times = [], {}
    for dtype_name in config.dtypes:
        for projection in config.projections:
            for ranks in config.rank_sets:
                log.info("kernels bench: %s %s ranks %s", projection.name, dtype_name, ranks)
                dtype = getattr(torch, dtype_name)
                weights = SlotWeights.build(projection, ranks, config.num_slots, dtype, device, config.seed)
                for case in _cases(config, projection, dtype_name, ranks):
                    key = (projection.name, dtype_name, case.batch.name)  # x @ W^T: once per shape
                    if config.time_base and key not in base_times:
                        base_times[key] = time_base(case, weights.base_weight, timer, config.seed)
                    result = run_case(case, weights, kernels, timer, config)
                    result["time_us"]["base_projection"] = base_times.get(key)
                    results.append(result)
                del weights  # the next slot buffers may need the memory
    return results


def _cases(config: KernelBenchConfig, projection: Projection, dtype: str, ranks: tuple[int, ...]):
    for batch in config.batches:
        for count in config.adapter_counts:
            if count <= len(batch.sequence_tokens):  # each adapter needs a sequence of its own
                for mix in ("identical",) if count == 1 else config.mixes:
                    yield Case(projection, dtype, ranks, batch, count, mix)


def load_kernels(device: torch.device):
    """lora_kernels, compiled on CUDA and interpreted on CPU (the only way Triton runs there); and
    whether it is interpreted. Triton picks the mode as the kernels are defined, from TRITON_INTERPRET."""
    if device.type == "cpu" and "loraplex.shard.lora_kernels" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    from loraplex.shard import lora_kernels

    interpreted = isinstance(lora_kernels._shrink_kernel, InterpretedFunction)
    if interpreted != (device.type == "cpu"):
        raise ValueError(
            f"the Triton kernels are {'interpreted' if interpreted else 'compiled'} but the device is "
            f"{device}: run on a GPU with TRITON_INTERPRET=0 and on CPU with TRITON_INTERPRET=1"
        )
    return lora_kernels, interpreted


def mix_counts(mix: str, num_sequences: int, num_adapters: int, zipf_alpha: float = 1.0) -> list[int]:
    """Sequences per adapter, each adapter getting at least one: identical (one adapter), uniform
    (as even as the counts allow) or zipf (the rest shared in proportion to 1 / k^alpha)."""
    if not 1 <= num_adapters <= num_sequences or (mix == "identical") != (num_adapters == 1):
        raise ValueError(f"{mix} cannot spread {num_sequences} sequences over {num_adapters} adapters")
    if mix != "zipf":
        return [
            num_sequences // num_adapters + (k < num_sequences % num_adapters) for k in range(num_adapters)
        ]
    weights = [1.0 / (k + 1) ** zipf_alpha for k in range(num_adapters)]
    shares = [(num_sequences - num_adapters) * w / sum(weights) for w in weights]
    counts = [1 + math.floor(share) for share in shares]
    by_remainder = sorted(range(num_adapters), key=lambda k: (math.floor(shares[k]) - shares[k], k))
    for k in by_remainder[: num_sequences - sum(counts)]:  # largest remainders first
        counts[k] += 1
    return counts


def step_runs(case: Case, num_slots: int, zipf_alpha: float, rng: random.Random) -> list[tuple[int, int]]:
    """(slot, tokens) per sequence, the adapters in random slots and dealt to random sequences, in the
    order the engine puts a step's chunks: by slot, so each adapter's tokens form one segment."""
    counts = mix_counts(case.mix, len(case.batch.sequence_tokens), case.num_adapters, zipf_alpha)
    slots = rng.sample(range(num_slots), case.num_adapters)
    dealt = [slot for slot, count in zip(slots, counts, strict=True) for _ in range(count)]
    rng.shuffle(dealt)
    return sorted(zip(dealt, case.batch.sequence_tokens, strict=True), key=lambda run: run[0])


@dataclass
class SlotWeights:
    lora_a: torch.Tensor  # [N, R, in], zero past each slot's rank
    lora_b: torch.Tensor  # [N, out, R], zero past each slot's rank
    scalings: torch.Tensor  # [N] float32
    # per slot, the baseline's own copies at the adapter's rank: A [r, in], B [out, r], scaling
    adapters: list[tuple[torch.Tensor, torch.Tensor, float]]
    base_weight: torch.Tensor  # [out, in], the dense projection

    @classmethod
    def build(
        cls,
        projection: Projection,
        ranks: tuple[int, ...],
        num_slots: int,
        dtype: torch.dtype,
        device: torch.device,
        seed: int,
    ) -> SlotWeights:
        """Random slots of ranks cycling over `ranks`, scaled so that every delta is O(1), as the tests'."""
        import torch

        generator = torch.Generator(device=device).manual_seed(seed)
        max_rank, slot_ranks = max(ranks), [ranks[slot % len(ranks)] for slot in range(num_slots)]
        rank = torch.tensor(slot_ranks, device=device)
        keep = torch.arange(max_rank, device=device) < rank[:, None]  # [N, R]
        size_in, size_out = projection.in_features, projection.out_features
        a = torch.randn(num_slots, max_rank, size_in, generator=generator, device=device) / math.sqrt(size_in)
        b = (
            torch.randn(num_slots, size_out, max_rank, generator=generator, device=device)
            / rank.sqrt()[:, None, None]
        )
        lora_a, lora_b = (a * keep[:, :, None]).to(dtype), (b * keep[:, None, :]).to(dtype)
        factors = [LORA_ALPHA / r * (slot + 1) / num_slots for slot, r in enumerate(slot_ranks)]
        adapters = [
            (lora_a[slot, :r].contiguous(), lora_b[slot, :, :r].contiguous(), factors[slot])
            for slot, r in enumerate(slot_ranks)
        ]
        base = torch.randn(size_out, size_in, generator=generator, device=device) / math.sqrt(size_in)
        scalings = torch.tensor(factors, dtype=torch.float32, device=device)
        return cls(lora_a, lora_b, scalings, adapters, base.to(dtype))


def per_adapter_loop(x, y, segments, adapters, columns: slice) -> None:
    """The baseline: y[rows, columns] += s_k * (x[rows] @ A_k^T) @ B_k^T for each adapter's contiguous
    rows, in the operands' dtype (two GEMMs per adapter, the second adding into y)."""
    for start, length, slot in segments:
        if slot >= 0:
            a, b, scaling = adapters[slot]
            rows = slice(start, start + length)
            y[rows, columns].addmm_(x[rows] @ a.t(), b.t(), alpha=scaling)


def run_case(case: Case, weights: SlotWeights, kernels, timer, config: KernelBenchConfig) -> dict:
    """One case: the step, the correctness checks (which also compile the kernels for its shapes), then
    the timings of our kernels and of the baseline loop."""
    import torch

    from loraplex.shard.lora_ops import build_lora_metadata

    device, dtype, projection = weights.lora_a.device, weights.lora_a.dtype, case.projection
    rng = random.Random(f"{config.seed}/{case.name}")
    meta = build_lora_metadata(step_runs(case, config.num_slots, config.zipf_alpha, rng), device)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    x = torch.randn(meta.num_tokens, projection.in_features, generator=generator, device=device).to(dtype)
    y = torch.randn(meta.num_tokens, projection.width, generator=generator, device=device).to(dtype)
    columns = slice(projection.out_offset, projection.out_offset + projection.out_features)

    def ours(out: torch.Tensor) -> torch.Tensor:
        shrunk = kernels.shrink(x, weights.lora_a, meta)  # [T, R] float32
        kernels.expand(
            out, shrunk, weights.lora_b, weights.scalings, meta, columns.start, columns.stop - columns.start
        )
        return shrunk

    def baseline(out: torch.Tensor) -> None:
        per_adapter_loop(x, out, meta.segments, weights.adapters, columns)

    try:
        correctness = check_case(case, weights, meta, x, y, columns, ours, baseline)
    except Exception as error:  # a kernel that does not compile or launch fails its case, not the run
        log.exception("kernels bench: %s raised", case.name)
        correctness = {"passed": False, "error": f"{type(error).__name__}: {error}"}
    y = y.clone()  # the timed calls add into it over and over: its values are not looked at
    times = {
        "kernels": timer(lambda: ours(y)) if "error" not in correctness else None,
        "baseline": timer(lambda: baseline(y)),
    }
    return {
        "name": case.name,
        "projection": asdict(projection) | {"y_width": projection.width},
        "dtype": case.dtype,
        "ranks": list(case.ranks),
        "batch": case.batch.name,
        "num_sequences": len(case.batch.sequence_tokens),
        "num_tokens": meta.num_tokens,
        "mix": case.mix,
        "adapters": case.num_adapters,
        "segments": [  # (tokens, slot, the slot's rank) per segment, in row order
            [length, slot, weights.adapters[slot][0].shape[0]] for _, length, slot in meta.segments
        ],
        "correctness": correctness,
        "time_us": times,
    }


def check_case(case: Case, weights: SlotWeights, meta, x, y, columns: slice, ours, baseline) -> dict:
    """Our shrink and our output against the float32 reference; the columns outside the projection's
    slice of y must stay bit-identical. The baseline loop's error is recorded for information."""
    import torch

    from loraplex.shard.lora_ops import KERNEL_TOLERANCES, expand_reference, shrink_reference

    expected, actual, looped = y.clone(), y.clone(), y.clone()
    expected_shrunk = shrink_reference(x, weights.lora_a, meta)
    size = columns.stop - columns.start
    expand_reference(expected, expected_shrunk, weights.lora_b, weights.scalings, meta, columns.start, size)
    shrunk = ours(actual)
    baseline(looped)
    outside = torch.ones(y.shape[1], dtype=torch.bool, device=y.device)
    outside[columns] = False
    tolerance = KERNEL_TOLERANCES[case.dtype]
    checks = {
        "shrink": compare(shrunk, expected_shrunk, tolerance),
        "output": compare(actual[:, columns], expected[:, columns], tolerance),
        "outside_slice_unchanged": bool(torch.equal(actual[:, outside], y[:, outside])),
    }
    passed = checks["shrink"]["passed"] and checks["output"]["passed"] and checks["outside_slice_unchanged"]
    baseline_output = compare(looped[:, columns], expected[:, columns], tolerance)
    return {**checks, "passed": passed, "baseline_output": baseline_output}


def time_base(case: Case, weight: torch.Tensor, timer, seed: int) -> dict:
    """The dense projection x @ W^T on the case's tokens (as F.linear, a fresh output each call)."""
    import torch

    generator = torch.Generator(device=weight.device).manual_seed(seed)
    tokens = sum(case.batch.sequence_tokens)
    x = torch.randn(tokens, weight.shape[1], generator=generator, device=weight.device).to(weight.dtype)
    return timer(lambda: torch.nn.functional.linear(x, weight))


# --- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's flags (for `loraplex bench kernels` and `python -m`); the grid narrows by name."""
    parser.add_argument(
        "--device", default="cpu", help="cuda, cuda:N or cpu (cpu: the tiny grid, interpreted)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny shapes (the default on CPU): a smoke run in seconds"
    )
    parser.add_argument(
        "--dtypes", default="", help="subset of bfloat16,float16 (or float32), comma-separated"
    )
    parser.add_argument("--projections", default="", help="subset of the grid's, e.g. q,down")
    parser.add_argument("--batches", default="", help="subset of the grid's, e.g. decode64,prefill")
    parser.add_argument("--adapter-counts", default="", help="distinct adapters per step, e.g. 1,4,16,64")
    parser.add_argument("--ranks", default="", help="rank sets, slash within a set: 16,64,8/16/32/64")
    parser.add_argument("--mixes", default="", help="subset of uniform,zipf for counts > 1")
    parser.add_argument("--reps", type=int, default=0, help="timed calls per system (0: the grid's)")
    parser.add_argument("--skip-base", action="store_true", help="do not time the dense projection")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results"))
    parser.add_argument("--log-level", default="INFO")


def config_from_args(args: argparse.Namespace) -> KernelBenchConfig:
    quick = args.quick or args.device == "cpu"
    grid = KernelBenchConfig.quick(args.device) if quick else KernelBenchConfig(device=args.device)
    changes: dict = {"output_dir": args.output_dir, "seed": args.seed, "time_base": not args.skip_base}
    if args.reps:
        changes["reps"] = args.reps
    for field, text, known in (
        ("projections", args.projections, grid.projections),
        ("batches", args.batches, grid.batches),
    ):
        if text:
            by_name = {item.name: item for item in known}
            if unknown := [name for name in text.split(",") if name not in by_name]:
                raise ValueError(f"--{field} {unknown} not in this grid's {list(by_name)}")
            changes[field] = tuple(by_name[name] for name in text.split(","))
    if args.dtypes:
        changes["dtypes"] = tuple(args.dtypes.split(","))
    if args.mixes:
        changes["mixes"] = tuple(args.mixes.split(","))
    if args.adapter_counts:
        changes["adapter_counts"] = tuple(int(count) for count in args.adapter_counts.split(","))
        changes["num_slots"] = max(grid.num_slots, *changes["adapter_counts"])
    if args.ranks:
        changes["rank_sets"] = tuple(
            tuple(int(r) for r in ranks.split("/")) for ranks in args.ranks.split(",")
        )
    return replace(grid, **changes)


def run_from_args(args: argparse.Namespace) -> int:
    """Run with add_arguments' flags, print the table and where the report went; 1 if a case failed."""
    result = run_kernel_bench(config_from_args(args))
    print(summary_table(result.report))
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0 if result.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loraplex.tools.bench_kernels", description=__doc__.split("\n")[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run_from_args(args)
    except ValueError as error:
        print(f"bench kernels: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
