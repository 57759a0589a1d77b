"""The shard's engine: continuous batching over the paged KV cache, on its own thread.

`step` reads as schedule -> run -> postprocess. Requests and aborts arrive through a thread-safe inbox
and join at the next step; each request's outputs go to the callback it was submitted with, called on
the engine thread (the service hops them onto its event loop).

With `tp_size` > 1 this is the first of the shard's tensor-parallel ranks: it schedules and samples,
and `TensorParallelPeers` has the other ranks run each step with it. Losing a rank is fatal: the
engine fails what it holds with UNAVAILABLE (the router retries elsewhere) and tells `on_failure`
listeners, and the server goes down.

So is a stuck engine (vLLM's engine iteration timeout): a watchdog thread fails everything the engine
holds with UNAVAILABLE and tells the listeners when one step has run for `step_timeout_s`, or the
engine thread has died. A hung kernel or a deadlock would otherwise leave a shard that heartbeats,
answers health checks and keepalive pings, and takes requests it never serves.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from loraplex.shard.adapter_slots import AdapterSlots
from loraplex.shard.block_manager import BlockManager
from loraplex.shard.context_limits import ContextExceeded
from loraplex.shard.kv_cache import allocate_kv_cache, kv_budget_bytes, num_blocks_for
from loraplex.shard.lora import LoraAdapter, load_adapter
from loraplex.shard.lora_slots import RankAdapters, build_lora_slots, resolve_backend
from loraplex.shard.model import check_tensor_parallel
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.model_runner import ChunkResult, ModelRunner
from loraplex.shard.outputs import OutputProcessor, RequestFailed, TokenOutput
from loraplex.shard.parallel import TensorParallel
from loraplex.shard.prompts import PromptEncoder
from loraplex.shard.sampling import SamplingParams
from loraplex.shard.scheduler import Scheduler
from loraplex.shard.sequence import Sequence
from loraplex.shard.tensor_parallel import TensorParallelPeers
from loraplex.shard.tp_worker import RankMemory, RankSpec, weight_bytes
from loraplex.shard.weights import build_model, model_dtype

log = logging.getLogger("loraplex.engine")

EngineOutput = TokenOutput | RequestFailed
STUCK_JOIN_S = 2.0  # how long stop() waits for an engine thread the watchdog found stuck
TP_STEP_MARGIN_S = 30.0  # with tensor parallelism, the watchdog waits tp_timeout_s + this
OutputCallback = Callable[[EngineOutput], None]


@dataclass(frozen=True)
class EngineConfig:
    device: str = "cpu"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on GPU; or float32 / bfloat16 / float16
    block_size: int = 16
    kv_cache_bytes: int = 0  # 0: a share of free memory (see kv_cache.kv_budget_bytes)
    gpu_memory_fraction: float = 0.9
    max_batch_tokens: int = 0  # tokens per step; 0: 512 on CPU, 8192 on GPU
    max_running_requests: int = 0  # 0: 64 on CPU, 256 on GPU
    enable_prefix_caching: bool = True  # share the KV blocks of identical prompt prefixes
    max_gpu_adapters: int = 16  # adapters active in the batch at once (slots)
    adapter_cycle_s: float = 2.0  # a request starved of a slot this long makes busy slots drain for it
    max_lora_rank: int = 64  # adapters of higher rank are refused; sizes the kernels' slot buffers
    lora_backend: str = "auto"  # "torch" (per-segment matmuls) or "triton" (SGMV kernels); auto: by device
    tp_size: int = 1  # tensor-parallel ranks (processes; GPUs device, device + 1, ... on CUDA)
    tp_timeout_s: float = 120.0  # a rank stuck this long in a collective takes the shard down
    # one step running this long means the engine is stuck: the shard goes down (0: never). With
    # tp_size > 1 the watchdog waits at least tp_timeout_s + 30 s, so a stuck rank is named as such.
    step_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        """ValueError naming the first field out of bounds: a negative token budget or running limit
        would leave every request waiting forever (0 means the device's default)."""
        bounds = {
            "block_size": (self.block_size, 1),
            "kv_cache_bytes": (self.kv_cache_bytes, 0),
            "max_batch_tokens": (self.max_batch_tokens, 0),
            "max_running_requests": (self.max_running_requests, 0),
        }
        for name, (value, low) in bounds.items():
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")


@dataclass(frozen=True)
class EngineRequest:
    request_id: str  # unique among the engine's live requests
    prompt_ids: list[int]
    params: SamplingParams
    adapter: LoraAdapter | None = None
    want_prompt_logprobs: bool = False
    deadline: float | None = None  # time.monotonic() by which the request must be done


@dataclass(frozen=True)
class EngineStats:
    running_requests: int = 0
    waiting_requests: int = 0
    queued_tokens: int = 0  # prompt tokens still to compute plus output tokens still to generate
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    num_preemptions: int = 0  # since start: sequences whose blocks were taken back and recomputed
    num_prefix_hit_tokens: int = 0  # since start: prompt tokens whose K/V came from the prefix cache
    adapters_in_slots: tuple[tuple[str, int], ...] = ()  # (name, version) of each adapter in a slot
    slot_hits: int = 0  # since start: admissions whose adapter already had a slot
    slot_misses: int = 0  # ... and those that loaded it into one
    # time.time() when these figures were true: the heartbeat's report time, by which a router tells
    # the calls the report counts from those it does not (router.placement.InflightTracker)
    taken_at: float = field(default_factory=time.time)


@dataclass
class _Request:
    seq: Sequence
    outputs: OutputProcessor
    callback: OutputCallback


class Engine:
    def __init__(self, model_dir: Path, config: EngineConfig) -> None:
        self.config = config
        self.device = torch.device(config.device)
        self.model_config = ModelConfig.from_dir(model_dir)
        check_tensor_parallel(self.model_config, config.tp_size)
        self.dtype = model_dtype(self.device, config.dtype)
        lora_backend = resolve_backend(config.lora_backend, self.device)
        on_cpu = self.device.type == "cpu"
        self.peers: TensorParallelPeers | None = None
        # torch's CPU threads are per process: rank 0 takes its share while it runs and gives the
        # process's count back on stop (tests and benchmarks run several engines in one process)
        self._threads_before = torch.get_num_threads()
        self.cpu_threads = self._threads_before
        if on_cpu and config.tp_size > 1:  # the ranks share the cores
            self.cpu_threads = max(1, self._threads_before // config.tp_size)
        if config.tp_size > 1:
            torch.set_num_threads(self.cpu_threads)
            self.peers = TensorParallelPeers(
                RankSpec(
                    rank=0,
                    size=config.tp_size,
                    rendezvous="",
                    model_dir=model_dir,
                    device=str(self.device),
                    dtype=self.dtype,
                    block_size=config.block_size,
                    lora_backend=lora_backend,
                    num_slots=config.max_gpu_adapters,
                    max_lora_rank=config.max_lora_rank,
                    num_threads=self.cpu_threads,
                    timeout_s=config.tp_timeout_s,
                )
            )
        try:
            if self.peers is not None:
                self.peers.start()
            self._build(model_dir, config, lora_backend)
        except BaseException:
            self._stop_peers()
            raise

    def _build(self, model_dir: Path, config: EngineConfig, lora_backend: str) -> None:
        on_cpu = self.device.type == "cpu"
        self.model = build_model(
            self.model_config, model_dir, self.device, self.dtype, TensorParallel(0, config.tp_size)
        )
        budget = kv_budget_bytes(self.device, config.kv_cache_bytes, config.gpu_memory_fraction)
        max_running = config.max_running_requests or (64 if on_cpu else 256)
        bytes_per_token = self.model_config.kv_bytes_per_token(self.dtype, config.tp_size)  # on one rank
        num_blocks = min(
            num_blocks_for(budget, bytes_per_token, config.block_size),
            # more than every running sequence at full context could never be used
            -(-max_running * self.model_config.max_position_embeddings // config.block_size),
        )
        self.blocks = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.kv_cache = allocate_kv_cache(self.model, num_blocks, config.block_size)
        # every rank's weights and KV cache: the ranks' block tables are the first rank's, so their
        # caches have the same number of blocks
        self.rank_memory = [RankMemory(0, weight_bytes(self.model), self.kv_cache.nbytes)]
        if self.peers is not None:
            self.rank_memory += self.peers.setup(num_blocks)
        self.max_context = min(self.model_config.max_position_embeddings, num_blocks * config.block_size)
        self.lora_weights = build_lora_slots(
            self.model, lora_backend, config.max_gpu_adapters, config.max_lora_rank, self.dtype, self.device
        )
        self.rank_adapters = RankAdapters(self.model, self.lora_weights)
        self.slots = AdapterSlots(config.max_gpu_adapters, self._write_slot)
        self.scheduler = Scheduler(
            self.blocks,
            config.max_batch_tokens or (512 if on_cpu else 8192),
            max_running,
            self.slots,
            config.adapter_cycle_s,
        )
        self.runner = ModelRunner(self.model, config.block_size, self.device, self.lora_weights, self.peers)
        self.prompts = PromptEncoder(model_dir, self.model_config.vocab_size, self.max_context)
        self.stats = EngineStats(kv_blocks_free=num_blocks)
        self.failure: str | None = None  # set when a tensor-parallel rank is lost; the engine is done
        self._failure_listeners: list[Callable[[str], None]] = []
        self._submit_lock = threading.Lock()  # a submit either reaches the inbox or sees the failure
        self._requests: dict[str, _Request] = {}
        self._num_preemptions = 0
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # time.monotonic() as the running step began
        self._stopping = threading.Event()
        self._watchdog: threading.Thread | None = None
        if self.peers is not None:
            self.peers.watch(lambda message: self._inbox.put(("fatal", message)))
        log.info(
            "engine ready: %d KV blocks of %d tokens (%.0f MiB per rank), context %d",
            num_blocks,
            config.block_size,
            self.kv_cache.nbytes / 2**20,
            self.max_context,
        )
        if self.peers is not None:
            log.info(
                "tensor parallel over %d ranks; weights per rank: %s MiB",
                config.tp_size,
                ", ".join(f"{memory.weight_bytes / 2**20:.1f}" for memory in self.rank_memory),
            )

    # --- called from any thread ------------------------------------------------------------------

    def submit(self, request: EngineRequest, callback: OutputCallback) -> None:
        with self._submit_lock:
            if self.failure is None:
                self._inbox.put(("submit", (request, callback)))
                return
        callback(RequestFailed("unavailable", self._failure_message()))

    def on_failure(self, listener: Callable[[str], None]) -> None:
        """listener(message) runs (on the engine or its watchdog's thread) if the engine can no longer
        serve: a tensor-parallel rank was lost, or the engine is stuck. Every request it held has failed
        with reason "unavailable"."""
        self._failure_listeners.append(listener)

    def abort(self, request_id: str) -> None:
        """Drop the request and free its KV blocks before the next step (no-op if it already ended)."""
        self._inbox.put(("abort", request_id))

    def load_adapter(self, source: str, name: str, version: int) -> LoraAdapter:
        """Read an adapter from a local source and check it against this model (any thread). Its
        tensors stay in host memory (the CPU tier), pinned on a GPU shard so that taking a slot is an
        asynchronous copy."""
        adapter = load_adapter(
            source,
            name,
            version,
            self.model.lora_targets(),  # checked against the whole model's shapes
            self.model_config.num_layers,
            self.config.max_lora_rank,
            self.dtype,
            pin_memory=self.device.type == "cuda",
        )
        self.rank_adapters.add(adapter)
        if self.peers is not None:
            self.peers.add_adapter(adapter)
        return adapter

    def _write_slot(self, slot: int, adapter: LoraAdapter) -> None:
        """Copy an adapter into a slot, this rank's slice here and the same slot on every other rank."""
        self.rank_adapters.write(slot, adapter.uid, adapter)
        if self.peers is not None:
            self.peers.write_slot(slot, adapter)

    def drop_adapter(self, adapter_uid: int) -> None:
        """Free the adapter's slot once no running sequence uses it (after a delete, an update or its
        eviction from the CPU tier)."""
        self.rank_adapters.forget(adapter_uid)
        self._inbox.put(("drop_adapter", adapter_uid))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()
        if self.step_timeout_s > 0:
            self._watchdog = threading.Thread(target=self._watch, name="engine-watchdog", daemon=True)
            self._watchdog.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._inbox.put(("stop", None))
            # a stuck engine thread never reads "stop": after a stall, give it a moment, then leave it
            # (a daemon thread; the process is going down)
            self._thread.join(timeout=STUCK_JOIN_S if self.failure is not None else None)
            if self._thread.is_alive():
                log.error("the engine thread is still stuck; leaving it behind")
            self._thread = None
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        self._stop_peers()

    @property
    def step_timeout_s(self) -> float:
        """How long one step may run before the watchdog declares the engine stuck (0: never)."""
        timeout = self.config.step_timeout_s
        if timeout > 0 and self.config.tp_size > 1:
            return max(timeout, self.config.tp_timeout_s + TP_STEP_MARGIN_S)
        return timeout

    def _stop_peers(self) -> None:
        if self.peers is not None:
            self.peers.stop()
            torch.set_num_threads(self._threads_before)

    def generate(self, requests: list[EngineRequest]) -> dict[str, list[EngineOutput]]:
        """Run requests to completion on the calling thread (offline use: tests, benchmarks); they
        are all submitted at once and so share batches. Not for use while the thread is started."""
        if self._thread is not None:
            raise RuntimeError("generate() drives the engine inline; the engine thread is running")
        outputs: dict[str, list[EngineOutput]] = {r.request_id: [] for r in requests}
        for request in requests:
            self._add(request, outputs[request.request_id].append)
        while self.scheduler.has_work:
            self.step()
        return outputs

    # --- the engine thread -----------------------------------------------------------------------

    def _loop(self) -> None:
        if self.device.type == "cuda":  # the current device is per thread; kernels launch on it
            torch.cuda.set_device(self.device)
        while True:
            try:
                if not self._drain_inbox(block=not self.scheduler.has_work):
                    return
                if self.scheduler.has_work:
                    self._step_started = time.monotonic()
                    try:
                        self.step()
                    finally:
                        self._step_started = None
                if self.failure is not None:  # the watchdog gave up on a step that has now returned
                    return
            except Exception as error:
                if self.peers is not None:  # the ranks may be out of step: this shard cannot go on
                    log.exception("tensor-parallel step failed; the shard goes down")
                    message = self.peers.explain(error)
                    _call_safely(self.peers.fail, message)
                    self._die(message)
                    return
                # keep serving: fail what was in flight, not the shard
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all("the shard hit an internal error while running this request")

    def _die(self, message: str) -> None:
        """Fail every request held or queued with "unavailable", stop taking new ones, and tell the
        listeners. Never raises: the listeners (the server going down) are told whatever else fails."""
        with self._submit_lock:
            self.failure = message
        self._fail_all(self._failure_message(), reason="unavailable")
        self._fail_queued(RequestFailed("unavailable", self._failure_message()))
        _call_safely(self._publish_stats)
        for listener in self._failure_listeners:
            _call_safely(listener, message)

    def _fail_queued(self, failure: RequestFailed) -> None:
        """Empty the inbox, failing the submits in it (the rest, aborts and drops, no longer matter)."""
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "submit":
                _, callback = payload  # type: ignore[misc]
                _call_safely(callback, failure)

    def _failure_message(self) -> str:
        return f"this shard can no longer serve ({self.failure}); retry on another shard"

    def _watch(self) -> None:
        """The watchdog: every second (or quarter timeout), is a step overdue or the thread gone?"""
        timeout = self.step_timeout_s
        while not self._stopping.wait(min(1.0, timeout / 4)) and self.failure is None:
            started = self._step_started
            if started is not None and time.monotonic() - started > timeout:
                log.error("raise --step-timeout if engine steps this long are expected")
                self._give_up(f"the engine is stuck: a step has run for more than {timeout:g} s")
                return
            if self._thread is not None and not self._thread.is_alive() and not self._stopping.is_set():
                self._give_up("the engine thread died")
                return

    def _give_up(self, message: str) -> None:
        """`_die` for an engine thread that cannot run it: fail every request held or queued from the
        watchdog's thread, without touching the scheduler the stuck thread may be inside."""
        log.error("%s; failing its requests and going down", message)
        with self._submit_lock:
            self.failure = message
        failure = RequestFailed("unavailable", self._failure_message())
        for request in list(self._requests.values()):  # list() copies under the GIL
            _call_safely(request.callback, failure)
        self._fail_queued(failure)
        if self.peers is not None:
            _call_safely(self.peers.fail, message)
        for listener in self._failure_listeners:
            _call_safely(listener, message)

    def _drain_inbox(self, block: bool) -> bool:
        """Apply queued submits and aborts, then publish the stats once (each publication counts every
        sequence: publishing per item made a burst of n submits cost n^2); False once asked to stop."""
        applied = False
        while True:
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                if applied:
                    self._publish_stats()
                return True
            block, applied = False, True
            if kind == "stop":
                self._fail_all("the shard is shutting down; retry on another shard", reason="unavailable")
                return False
            if kind == "fatal":
                self._die(payload)  # type: ignore[arg-type]
                return False
            if kind == "submit":
                self._add(*payload)  # type: ignore[misc]
            elif kind == "abort":
                self._finish(payload)  # type: ignore[arg-type]
            elif kind == "drop_adapter":
                self.slots.drop(payload)  # type: ignore[arg-type]
                if self.peers is not None:
                    self.peers.forget_adapter(payload)  # type: ignore[arg-type]

    def _add(self, request: EngineRequest, callback: OutputCallback) -> None:
        refusal = self._refusal(request)
        if refusal is not None:  # it could never run: waiting for it would loop (or fail the batch)
            _call_safely(callback, RequestFailed("error", refusal))
            return
        seq = Sequence(
            request_id=request.request_id,
            token_ids=list(request.prompt_ids),
            num_prompt_tokens=len(request.prompt_ids),
            params=request.params,
            adapter=request.adapter,
            want_prompt_logprobs=request.want_prompt_logprobs,
            deadline=request.deadline,  # the prefix-cache salt is the adapter copy's uid (see Sequence)
        )
        outputs = OutputProcessor(
            request.params,
            self.prompts.tokenizer,
            frozenset(self.model_config.eos_token_ids),
            self.max_context,
            request.want_prompt_logprobs,
            request.prompt_ids,
        )
        self._requests[request.request_id] = _Request(seq, outputs, callback)
        self.scheduler.add(seq)

    def _refusal(self, request: EngineRequest) -> str | None:
        """Why the engine cannot serve the request at all (None: it can). The service checks prompts
        first; this guards every other caller: a prompt larger than the whole KV cache would wait for
        blocks forever, an empty one has no position to predict from, a token id outside the vocabulary
        has no embedding."""
        if request.request_id in self._requests:  # its entry would be overwritten, its blocks leaked
            return f"request id {request.request_id!r} is already in use by a request in flight"
        num_prompt_tokens = len(request.prompt_ids)
        if num_prompt_tokens == 0:
            return "the prompt is empty"
        if num_prompt_tokens > self.max_context:
            return ContextExceeded(self.max_context, num_prompt_tokens).message()
        try:  # an id outside the embedding table would fail the step, and every request in it
            self.prompts.check_token_ids(request.prompt_ids)
        except ValueError as error:
            return str(error)
        return None

    def step(self) -> None:
        """One iteration: schedule, run the model, turn logits into tokens and outputs."""
        self._expire_deadlines()
        schedule = self.scheduler.schedule()
        self._num_preemptions += len(schedule.preempted)
        deliveries: list[tuple[_Request, EngineOutput]] = []
        if schedule.chunks:
            results = self.runner.run(schedule.chunks)
            self.scheduler.advance(schedule.chunks)
            deliveries = [delivery for result in results if (delivery := self._postprocess(result))]
        # Stats first: whoever sees a request end (a shard's caller, through it a router) then finds
        # it gone from the stats the shard reports, never still counted.
        self._publish_stats()
        for request, output in deliveries:
            _deliver(request, output)

    def _postprocess(self, result: ChunkResult) -> tuple[_Request, EngineOutput] | None:
        """The sequence's next token and the output to deliver for it (None while prefill goes on).

        Each sequence samples on its own (one `choose` per row, not one batched call), so a row whose
        sampling fails (say, NaN logits) fails only its own request; SamplingParams' checks keep
        valid parameters from getting there. The try costs nothing while nothing raises."""
        seq = result.chunk.seq
        request = self._requests[seq.request_id]
        request.outputs.prompt_logprobs.extend(result.prompt_logprobs)
        seq.num_prompt_logprobs += len(result.prompt_logprobs)
        if result.next_token_logits is None:
            return None
        try:
            token = request.outputs.sampler.choose(result.next_token_logits, seq.token_ids)
        except Exception:
            log.exception("choosing the next token of request %s failed", seq.request_id)
            failed = RequestFailed("error", "the shard could not choose this request's next token")
            self._finish(seq.request_id)
            return request, replace(failed, times=seq.times(time.time_ns()))
        seq.token_ids.append(token.token_id)
        seq.first_token_ns = seq.first_token_ns or time.time_ns()
        output = request.outputs.process(token, seq.token_ids, seq.num_prompt_tokens)
        if output.finish_reason:
            output = replace(output, times=seq.times(time.time_ns()))
            self._finish(seq.request_id)
        return request, output

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        expired = [
            seq.request_id
            for seq in self.scheduler.sequences()
            if seq.deadline is not None and now > seq.deadline
        ]
        if expired:
            self._fail(expired, RequestFailed("deadline", "the request's deadline passed"))

    def _finish(self, request_id: str) -> None:
        """Drop the request and free its blocks and slot at once (no-op if it already ended)."""
        request = self._requests.pop(request_id, None)
        if request is not None:
            self.scheduler.finish(request.seq)

    def _fail(self, request_ids: list[str], failure: RequestFailed) -> None:
        """Drop the requests, publish stats without them, then tell their callers (stats first, as in
        `step`). Never raises: each caller hears of its failure even if freeing its request failed."""
        failed = [request for request_id in request_ids if (request := self._requests.get(request_id))]
        for request in failed:
            _call_safely(self._finish, request.seq.request_id)
        _call_safely(self._publish_stats)
        for request in failed:
            _deliver(request, replace(failure, times=request.seq.times(time.time_ns())))

    def _fail_all(self, message: str, reason: str = "error") -> None:
        """Fail every request held. Never raises, so that each request is told and the engine thread
        (or `_die`) goes on even if one request's bookkeeping is broken."""
        self._fail(list(self._requests), RequestFailed(reason, message))

    def _publish_stats(self) -> None:
        sequences = self.scheduler.sequences()
        self.stats = EngineStats(
            running_requests=len(self.scheduler.running),
            waiting_requests=len(self.scheduler.waiting),
            queued_tokens=sum(seq.num_remaining_tokens for seq in sequences),
            kv_blocks_used=self.blocks.num_used_blocks,
            kv_blocks_free=self.blocks.num_free_blocks,
            num_preemptions=self._num_preemptions,
            num_prefix_hit_tokens=self.blocks.num_prefix_hit_tokens,
            adapters_in_slots=tuple((a.name, a.version) for a in self.slots.held()),
            slot_hits=self.slots.counters.hits,
            slot_misses=self.slots.counters.misses,
        )


def _call_safely(function: Callable[..., object], *args: object) -> None:
    """Run function, logging rather than raising what it raises: for the failure paths, which must
    reach every request and listener."""
    try:
        function(*args)
    except Exception:
        log.exception(
            "%s failed while the engine was failing requests", getattr(function, "__name__", function)
        )


def _deliver(request: _Request, output: EngineOutput) -> None:
    """Hand an output to its request's callback; a failing callback (e.g. its event loop has closed)
    is that request's problem, never the batch's."""
    try:
        request.callback(output)
    except Exception:
        log.exception("output callback of request %s failed", request.seq.request_id)
