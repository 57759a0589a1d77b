"""Environment defaults every loraplex process sets before gRPC and torch load, since both read them
once, at start. A value already in the environment wins: these are defaults, not overrides."""

from __future__ import annotations

import os

# Each group is set only where the environment sets none of its names, so an operator's own OpenMP
# choice (say OMP_WAIT_POLICY=PASSIVE) is never mixed with half of ours.
DEFAULTS = (
    # `loraplex up`, the benchmarks and the tests start processes while gRPC channels are live. With
    # gRPC's fork support on, its poller thread restarts in the child between fork and exec and can
    # abort on a closed epoll fd (grpc/grpc#43055): a shard then dies at start with SIGABRT.
    {"GRPC_ENABLE_FORK_SUPPORT": "false"},
    # torch's OpenMP runtime (libgomp) gives each thread that runs a parallel region a worker team of
    # its own, kept for the thread's life. A shard has several such threads: the engine's, the one
    # that built the model, the adapter loaders. Once those threads outnumber the cores, libgomp stops
    # idle workers spinning, so every parallel region of the engine waits on a futex wake-up (~90 us
    # on the 2-core CI machine): +20% step time, and LoRA's small GEMMs 8x slower. Spinning for
    # libgomp's usual count (300k) whatever the thread count keeps the hand-off fast; idle workers
    # still go to sleep after it.
    {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"},
)


def missing_defaults() -> dict[str, str]:
    """The defaults the environment does not set yet: `os.environ.update(missing_defaults())`."""
    missing: dict[str, str] = {}
    for group in DEFAULTS:
        if not any(name in os.environ for name in group):
            missing |= group
    return missing
