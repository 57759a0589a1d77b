"""How `loraplex bench kernels` times a call: on CUDA with events, from a flushed L2, both as device time
alone and with the host's launch path; on CPU with a wall clock (the kernels interpreted there)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from loraplex.tools.bench_kernels_report import time_stats

if TYPE_CHECKING:
    import torch


class CpuTimer:
    method = (
        "time.perf_counter around each call, median of the reps; the kernels run in Triton's interpreter "
        "(TRITON_INTERPRET=1), so their times measure the interpreter, not the kernels"
    )

    def __init__(self, reps: int) -> None:
        self.reps = reps

    def __call__(self, fn: Callable[[], object]) -> dict:
        times = []
        for _ in range(self.reps):
            started = time.perf_counter()
            fn()
            times.append((time.perf_counter() - started) * 1e6)
        return {"kernel": None, "eager": time_stats(times)}


class CudaTimer:
    """Two CUDA-event times per call, each rep starting from a flushed L2 (weights are cold, as they are
    when a forward pass reaches a layer): `kernel`, with the launches queued ahead of the GPU (a spin
    before the start event outlasts the host's launch path), is the device time alone; `eager`, issued
    to an idle GPU, adds the host's launch path (Python wrappers, argument checks, launch overhead) as
    an engine without CUDA graphs pays it."""

    method = (
        "CUDA events per call, median of the reps after warm-up calls; L2 flushed (256 MiB written) before "
        "each rep; kernel: launches queued behind a GPU spin, device time only; eager: issued to an idle "
        "GPU, host launch path included"
    )

    def __init__(self, device: torch.device, warmup: int, reps: int) -> None:
        import torch

        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush = torch.empty(256 << 20, dtype=torch.int8, device=device)

    def __call__(self, fn: Callable[[], object]) -> dict:
        from torch import cuda

        for _ in range(self.warmup):
            fn()
        events = [(cuda.Event(enable_timing=True), cuda.Event(enable_timing=True)) for _ in range(self.reps)]
        host = []
        for start, end in events:  # eager
            cuda.synchronize(self.device)
            self.flush.zero_()
            cuda.synchronize(self.device)
            started = time.perf_counter()
            start.record()
            fn()
            end.record()
            host.append(time.perf_counter() - started)
        cuda.synchronize(self.device)
        eager = [start.elapsed_time(end) * 1e3 for start, end in events]
        spin_cycles = int(sorted(host)[len(host) // 2] * 4e9) + 20_000  # ~2x the host time at <= 2 GHz
        for start, end in events:  # kernel
            self.flush.zero_()
            cuda._sleep(spin_cycles)
            start.record()
            fn()
            end.record()
        cuda.synchronize(self.device)
        kernel = [start.elapsed_time(end) * 1e3 for start, end in events]
        return {"kernel": time_stats(kernel), "eager": time_stats(eager)}
