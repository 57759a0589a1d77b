"""The first rank's handle on the other tensor-parallel ranks of a shard (`--tp N`).

It starts ranks 1..N-1 as processes (`tp_worker`), joins their process group, and sends them, in the
order the engine thread makes them, each step's inputs and every adapter move: an adapter entering or
leaving the CPU tier, and an adapter written into a slot. Messages go down one pipe per rank, pickled
once; tensors meet in torch.distributed collectives inside the forward pass.

A rank that exits takes the shard down: a watcher thread sees it at once, stops the other ranks (so no
collective waits on them) and reports the failure; the engine fails what it holds with UNAVAILABLE,
and the server deregisters and exits, so the router fails over instead of waiting on a hung shard.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import multiprocessing
import pickle
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from multiprocessing.connection import Connection, wait

import torch.distributed as dist

from loraplex.shard.lora import LoraAdapter
from loraplex.shard.model_runner import StepInputs
from loraplex.shard.tp_worker import RankMemory, RankSpec, init_distributed, rank_device, run_rank

log = logging.getLogger("loraplex.tp")

STOP_TIMEOUT_S = 10.0  # a rank asked to stop that has not exited by then is killed


class TensorParallelFailure(RuntimeError):
    """A rank is gone or the ranks fell out of step; the shard cannot go on."""


class TensorParallelPeers:
    def __init__(self, spec: RankSpec) -> None:
        """spec: what every rank is built from (its rank and rendezvous are filled in here)."""
        self.size = spec.size
        self.failure: str | None = None
        self._failed = threading.Event()
        self._device = rank_device(spec.device, 0)
        # The process group's store: bound here, on loopback only, at a port the kernel picks, and
        # handed to torch as it is. A port picked free and bound later could be taken meanwhile (by
        # another shard's store, which our ranks would then join), and torch binds the port it is
        # given on every interface, where anyone reaching the machine could write into the group.
        self._listener: socket.socket | None = socket.create_server(("127.0.0.1", 0))
        port = self._listener.getsockname()[1]
        self._spec = replace(spec, rank=0, rendezvous=f"127.0.0.1:{port}")
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._pipes: list[Connection] = []
        self._send_lock = threading.Lock()  # steps come from the engine thread, adapters from loaders
        self._sent: set[int] = set()  # uids of the adapters the ranks hold
        self._stopping = False
        self._on_failure: Callable[[str], None] = lambda message: None

    # --- start-up --------------------------------------------------------------------------------

    def start(self) -> None:
        """Start ranks 1..N-1 and join their process group (they then build their model slices)."""
        if self._listener is None:
            raise RuntimeError("the ranks were started already")
        listener, self._listener = self._listener, None
        context = multiprocessing.get_context("spawn")  # fork is unsafe with torch and threads
        for rank in range(1, self.size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=run_rank,
                args=(replace(self._spec, rank=rank), theirs),
                name=f"loraplex-tp-rank{rank}",
                daemon=True,  # never outlive the first rank
            )
            process.start()
            theirs.close()
            self._processes.append(process)
            self._pipes.append(ours)
            log.info("started tensor-parallel rank %d (pid %d)", rank, process.pid)
        joined: list[BaseException | None] = []

        def join() -> None:
            try:
                host, port = self._spec.rendezvous.rsplit(":", 1)
                store = dist.TCPStore(
                    host,
                    int(port),
                    self.size,
                    is_master=True,
                    timeout=datetime.timedelta(seconds=self._spec.timeout_s),
                    wait_for_workers=False,  # init_distributed waits for them
                    master_listen_fd=listener.detach(),  # the store owns (and closes) it now
                )
                init_distributed(self._spec, self._device, store)
                joined.append(None)
            except BaseException as error:
                joined.append(error)

        joiner = threading.Thread(target=join, name="tp-join", daemon=True)
        joiner.start()
        while joiner.is_alive():  # a rank that dies while starting must not leave us waiting
            joiner.join(0.2)
            self._raise_if_a_rank_exited("while joining the process group")
        if joined[0] is not None:
            raise TensorParallelFailure(f"could not join the ranks' process group: {joined[0]}")

    def setup(self, num_blocks: int) -> list[RankMemory]:
        """Give every rank the KV cache size the first rank chose; returns each rank's memory."""
        self._send("setup", num_blocks)
        memories = []
        for pipe in self._pipes:
            while not pipe.poll(0.2):
                self._raise_if_a_rank_exited("while loading its slice of the model")
            memories.append(pickle.loads(pipe.recv_bytes()))
        return memories

    def watch(self, on_failure: Callable[[str], None]) -> None:
        """From now on, a rank that exits stops the others and calls on_failure(message) (once)."""
        self._on_failure = on_failure
        threading.Thread(target=self._watch, name="tp-watch", daemon=True).start()

    # --- what the engine sends -------------------------------------------------------------------

    def run_step(self, inputs: StepInputs) -> None:
        self._send("step", inputs)

    def add_adapter(self, adapter: LoraAdapter) -> None:
        """The adapter entered the first rank's CPU tier; each rank keeps its own slice of it."""
        self._send("adapter", adapter)
        self._sent.add(adapter.uid)

    def forget_adapter(self, adapter_uid: int) -> None:
        if adapter_uid in self._sent:
            self._sent.discard(adapter_uid)
            self._send("forget", adapter_uid)

    def write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Put the adapter in the same slot on every rank (engine thread)."""
        if adapter.uid not in self._sent:  # forgotten after a delete while a request still held it
            self.add_adapter(adapter)
        self._send("write_slot", (slot, adapter.uid))

    def _send(self, kind: str, payload: object) -> None:
        message = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            try:
                for pipe in self._pipes:
                    pipe.send_bytes(message)
            except OSError as error:  # BrokenPipeError: the rank is gone
                raise TensorParallelFailure(
                    self.failure or f"a tensor-parallel rank is gone: {error}"
                ) from error

    # --- failure and stop ------------------------------------------------------------------------

    def _raise_if_a_rank_exited(self, doing: str) -> None:
        for rank, process in enumerate(self._processes, start=1):
            if process.exitcode is not None:
                raise TensorParallelFailure(
                    f"tensor-parallel rank {rank} exited with code {process.exitcode} {doing}; "
                    "its log is above"
                )

    def _watch(self) -> None:
        ready = wait([process.sentinel for process in self._processes])
        if self._stopping or self.failure is not None:  # stopped, or already failed by the first rank
            return
        rank, process = next(
            (rank, p) for rank, p in enumerate(self._processes, start=1) if p.sentinel in ready
        )
        process.join(1.0)  # its sentinel can fire a moment before it can be reaped
        self.failure = f"tensor-parallel rank {rank} (pid {process.pid}) exited with code {process.exitcode}"
        self._failed.set()
        log.error("%s; taking the shard down", self.failure)
        self._kill_all()  # no rank may wait in a collective for the one that is gone
        self._on_failure(self.failure)

    def explain(self, error: BaseException) -> str:
        """Why a step failed: a collective fails the moment a peer's socket closes, a little before the
        watcher has reaped the rank, so give the watcher a moment to name it."""
        self._failed.wait(timeout=2.0)
        return self.failure or f"a tensor-parallel step failed: {error}"

    def fail(self, message: str) -> None:
        """The first rank gave up on the ranks (a step failed, e.g. a collective timed out on a stuck
        rank): stop them now rather than wait for them on stop."""
        if self.failure is None:
            self.failure = message
        self._failed.set()
        self._kill_all()

    def _kill_all(self) -> None:
        for process in self._processes:
            if process.exitcode is None:
                process.kill()

    def stop(self) -> None:
        """Stop the ranks (at once after a failure, else after they finish what they were sent)."""
        self._stopping = True
        if self.failure is None:
            with contextlib.suppress(TensorParallelFailure):
                self._send("stop", None)
        else:
            self._kill_all()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.warning("tensor-parallel rank %s did not stop; killing it", process.name)
                process.kill()
                process.join()
        for pipe in self._pipes:
            pipe.close()
        if self._listener is not None:  # never started
            self._listener.close()
        if dist.is_initialized():
            dist.destroy_process_group()
