"""A tensor-parallel rank other than the first: a process that holds its slice of the model, KV cache
and adapter slots, and runs what the first rank sends it, in the order it was sent.

The first rank (`tensor_parallel.TensorParallelPeers`) owns the gRPC service, the scheduler and
sampling; it sends each step's inputs and every adapter move down a pipe, and the ranks meet in the
model's all-reduces and the logits gather. A rank never decides anything itself, so every rank's
slots and block tables stay identical. The first rank's process ending ends the process, whatever it
is doing (joining the process group, loading the model, waiting in a collective); any error ends it
too, and the first rank, which watches every rank, then takes the shard down.
"""

from __future__ import annotations

import datetime
import logging
import multiprocessing
import os
import pickle
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist

from loraplex.shard.kv_cache import allocate_kv_cache
from loraplex.shard.lora_slots import RankAdapters, build_lora_slots
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.model_runner import ModelRunner
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.weights import build_model

log = logging.getLogger("loraplex.tp")


@dataclass(frozen=True)
class RankSpec:
    """What a rank needs to build its part (sent once, at start)."""

    rank: int
    size: int
    rendezvous: str  # host:port of the first rank's torch.distributed store
    model_dir: Path
    device: str  # the first rank's device; rank r of a CUDA shard runs on cuda:<first + r>
    dtype: torch.dtype
    block_size: int
    lora_backend: str  # resolved: torch or triton
    num_slots: int
    max_lora_rank: int
    num_threads: int  # torch CPU threads for this rank
    # A collective waits this long for a rank before failing: ranks only meet inside a step, where
    # they all run the same work, so a long wait means a rank is stuck, and the shard should go down.
    timeout_s: float = 120.0


@dataclass(frozen=True)
class RankMemory:
    """Bytes one rank holds for the model weights and the KV cache."""

    rank: int
    weight_bytes: int
    kv_cache_bytes: int


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r's device: the CPU for a CPU shard, the r-th GPU after the first rank's on a CUDA one."""
    first = torch.device(device)
    if first.type != "cuda":
        return first
    return torch.device("cuda", (first.index or 0) + rank)


def init_distributed(spec: RankSpec, device: torch.device, store: dist.Store | None = None) -> None:
    """Join the shard's process group: NCCL between GPUs, gloo on CPU. The first rank passes the store
    it serves at spec.rendezvous; the others connect to it there."""
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=spec.timeout_s)
    if store is None:
        host, port = spec.rendezvous.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), spec.size, is_master=False, timeout=timeout)
    dist.init_process_group(
        "nccl" if on_gpu else "gloo",
        store=store,
        rank=spec.rank,
        world_size=spec.size,
        timeout=timeout,
        device_id=device if on_gpu else None,  # binds NCCL to this rank's GPU, whatever thread calls
    )


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(param.nbytes for param in model.parameters())


def run_rank(spec: RankSpec, pipe: Connection) -> None:
    """The process body of ranks 1..N-1 (multiprocessing target)."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{spec.rank} %(name)s %(message)s")
    torch.set_num_threads(spec.num_threads)
    _exit_with_the_first_rank()
    device = rank_device(spec.device, spec.rank)
    init_distributed(spec, device)
    try:
        _serve(spec, device, pipe)
    finally:
        dist.destroy_process_group()


def _exit_with_the_first_rank() -> None:
    """End this process the moment the first rank's process is gone. Its pipe closing says so only
    when this rank next reads it; until then the rank could wait out the collective timeout joining a
    process group whose store is gone, or load a model nobody will use, holding its memory."""
    first_rank = multiprocessing.parent_process()
    if first_rank is None:  # not started by multiprocessing
        return

    def watch() -> None:
        first_rank.join()  # its sentinel: a pipe whose other end only the first rank's process holds
        log.warning("the first rank (pid %d) is gone; exiting", first_rank.pid)
        os._exit(1)  # at once: the main thread may be inside a call that never returns

    threading.Thread(target=watch, name="tp-first-rank-watch", daemon=True).start()


def _serve(spec: RankSpec, device: torch.device, pipe: Connection) -> None:
    tp = TensorParallel(spec.rank, spec.size)
    model = build_model(ModelConfig.from_dir(spec.model_dir), spec.model_dir, device, spec.dtype, tp)
    try:
        kind, num_blocks = _receive(pipe)
    except EOFError:
        return  # the first rank is gone (the watch thread will have ended us already, most likely)
    if kind == "stop":  # the first rank failed its own start (its error says why)
        return
    if kind != "setup":
        raise ValueError(f"expected the KV cache size from the first rank, got {kind!r}")
    kv_cache = allocate_kv_cache(model, num_blocks, spec.block_size)
    slots = build_lora_slots(model, spec.lora_backend, spec.num_slots, spec.max_lora_rank, spec.dtype, device)
    runner = ModelRunner(model, spec.block_size, device, slots)
    adapters = RankAdapters(model, slots)  # this rank's slice of every adapter the first rank holds
    pipe.send_bytes(pickle.dumps(RankMemory(spec.rank, weight_bytes(model), kv_cache.nbytes)))
    log.info("rank %d of %d ready on %s (pid %d)", spec.rank, spec.size, device, os.getpid())
    while True:
        try:
            kind, payload = _receive(pipe)
        except EOFError:
            log.warning("rank %d: the first rank is gone; exiting", spec.rank)
            return
        if kind == "step":
            runner.execute(payload)
        elif kind == "adapter":
            adapters.add(payload)
        elif kind == "forget":
            adapters.forget(payload)
        elif kind == "write_slot":
            adapters.write(*payload)
        elif kind == "stop":
            return
        else:
            raise ValueError(f"unknown message {kind!r} from the first rank")


def _receive(pipe: Connection) -> tuple[str, object]:
    return pickle.loads(pipe.recv_bytes())
