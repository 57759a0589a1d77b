"""The `loraplex worker` process: runs async jobs from the Redis stream through a router.

Each worker is one consumer in the stream's group and runs up to `concurrency` jobs at once, each as a
Generation/Generate call to the router. While a job runs, the worker keeps its entry's idle time fresh;
an entry left idle longer than `claim_idle_s` belongs to a dead worker and is reclaimed by a live one.
Results are stored exactly once (registry/jobs.py), so a job run twice after a reclaim is harmless.
SIGTERM drains: no new reads, in-flight jobs finish (up to `drain_timeout_s`), then exit; whatever is
left unfinished stays pending and another worker reclaims it. A worker leaves the consumer group as it
exits, and live workers delete the consumers of dead ones once nothing is pending on them.
An outcome that cannot be stored because Redis is briefly away is stored again until Redis is back
(for up to `claim_idle_s`), rather than thrown away and the job run again from the start.
A job submitted with a callback_url has its outcome POSTed there by the worker that stored it, once,
best-effort: a few tries, each with a short timeout; a callback that fails is logged, and the stored
outcome stands either way. Redirects are not followed (urllib would resend a POST as a bodiless GET).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import grpc
import redis.exceptions
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind
from prometheus_client import CollectorRegistry, Counter, Gauge

from loraplex.protos import telemetry
from loraplex.protos.metrics import serve_metrics
from loraplex.protos.rpc import client_options, stop_on_signals
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc
from loraplex.registry.jobs import DEFAULT_TTL_S, Delivery, JobQueue
from loraplex.router.gateway.jobs_api import job_to_dict

log = logging.getLogger("loraplex.worker")
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED})
STORE_ERRORS = (redis.exceptions.RedisError, OSError)
CALLBACK_ERRORS = (OSError, http.client.HTTPException, ValueError)  # urllib's HTTPError is an OSError
MAX_STORE_BACKOFF_S = 5.0
MAX_RETRY_BACKOFF_S = 10.0


@dataclass(frozen=True)
class WorkerConfig:
    router: str
    redis_url: str
    consumer: str  # this worker's name in the consumer group; unique per live worker
    namespace: str = "loraplex"
    concurrency: int = 8
    claim_idle_s: float = 30.0  # an entry idle this long belongs to a dead worker
    metrics_port: int = 9400  # 0 = no /metrics
    job_ttl_s: float = DEFAULT_TTL_S  # how long a finished job's outcome is kept
    request_timeout_s: float = 600.0  # deadline of one Generate call
    # how long a job is retried while the mesh answers UNAVAILABLE / RESOURCE_EXHAUSTED (a burst, a
    # shard restarting, a router rollout): a queue exists to wait these out, not to fail its jobs
    retry_for_s: float = 600.0
    retry_backoff_s: float = 0.5  # doubled after each retry, up to MAX_RETRY_BACKOFF_S
    max_deliveries: int = 5  # a job whose workers keep dying is failed after this many deliveries
    read_block_ms: int = 1000  # also bounds how long SIGTERM waits for the read loop
    backlog_interval_s: float = 1.0
    drain_timeout_s: float = 30.0
    callback_timeout_s: float = 5.0  # per POST to a job's callback_url
    callback_attempts: int = 3  # POSTs at most, backing off as Generate retries do

    def __post_init__(self) -> None:
        """Refuse values that would break the queue's contract rather than run with them: a claim_idle_s
        of 0 reclaims live workers' jobs (each runs many times), a job_ttl_s of 0 deletes each result as
        it is stored, a concurrency of 0 takes no job."""
        if self.retry_for_s < 0:
            raise ValueError(f"worker retry_for_s must be >= 0, got {self.retry_for_s}")
        for name in ("claim_idle_s", "job_ttl_s", "request_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"worker {name} must be > 0, got {getattr(self, name)}")
        if self.concurrency < 1:
            raise ValueError(f"worker concurrency must be at least 1, got {self.concurrency}")


class Failure(NamedTuple):
    code: str  # gRPC status name
    message: str


class WorkerMetrics:
    """The worker's Prometheus metrics, on a registry of their own (several workers may share a
    process in tests)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.backlog = Gauge(
            "loraplex_jobs_backlog",
            "jobs queued or running, not yet finished (all workers)",
            registry=self.registry,
        )
        self.completed = Counter(
            "loraplex_jobs_completed", "jobs this worker finished with a result", registry=self.registry
        )
        self.failed = Counter(
            "loraplex_jobs_failed", "jobs this worker finished with an error", registry=self.registry
        )


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        queue: JobQueue,
        generation: generation_pb2_grpc.GenerationStub,
        metrics: WorkerMetrics,
    ) -> None:
        self._config = config
        self._queue = queue
        self._generation = generation
        self._metrics = metrics
        self._inflight: dict[asyncio.Task, Delivery] = {}
        self._tracer = trace.get_tracer("loraplex.worker")

    async def run(self, stop: asyncio.Event) -> None:
        """Take and run jobs until stop is set, then drain the ones in flight."""
        helpers = [
            asyncio.create_task(self._keep_entries_fresh()),
            asyncio.create_task(self._report_backlog()),
        ]
        try:
            await self._take_jobs(stop)
            await self._drain()
            await self._leave_group()
        finally:
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)

    async def _take_jobs(self, stop: asyncio.Event) -> None:
        config = self._config
        next_reclaim = 0.0
        while not stop.is_set():
            free = config.concurrency - len(self._inflight)
            if free <= 0:
                await asyncio.wait(self._inflight, timeout=0.5, return_when=asyncio.FIRST_COMPLETED)
                continue
            try:
                deliveries = []
                if time.monotonic() >= next_reclaim:
                    claim_idle_ms = int(config.claim_idle_s * 1000)
                    deliveries = await self._queue.reclaim(config.consumer, claim_idle_ms, free)
                    next_reclaim = time.monotonic() + config.claim_idle_s / 2
                    if deliveries:
                        log.info("reclaimed %d jobs from a dead worker", len(deliveries))
                    await self._queue.prune_consumers(claim_idle_ms)  # dead workers left with nothing
                if not deliveries:
                    deliveries = await self._queue.read(config.consumer, free, config.read_block_ms)
            except STORE_ERRORS as error:
                log.warning("job queue unreachable, retrying in 1 s: %s", error)
                await _sleep_unless(stop, 1.0)
                continue
            for delivery in deliveries:
                task = asyncio.create_task(self._run_job(delivery))
                self._inflight[task] = delivery
                task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task) -> None:
        delivery = self._inflight.pop(task)
        if not task.cancelled() and task.exception() is not None:  # left pending: reclaimed later
            log.error("job %s crashed the worker's task", delivery.job_id, exc_info=task.exception())

    async def _drain(self) -> None:
        if not self._inflight:
            return
        log.info("draining %d jobs in flight", len(self._inflight))
        _, unfinished = await asyncio.wait(self._inflight, timeout=self._config.drain_timeout_s)
        for task in unfinished:  # their entries stay pending: another worker reclaims them
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)

    async def _leave_group(self) -> None:
        """Delete this worker's consumer unless it still owns entries (left for others to reclaim)."""
        try:
            await self._queue.prune_consumers(0, self._config.consumer)
        except STORE_ERRORS as error:  # a live worker prunes it later
            log.warning("could not leave the consumer group: %s", error)

    async def _run_job(self, delivery: Delivery) -> None:
        """One run of a job, in a trace of its own (the router's spans hang under it) linked to the
        span that submitted the job: a job may run long after its submission, and more than once."""
        with self._tracer.start_as_current_span(
            "worker.job",
            context=Context(),  # a root: never the submitter's trace
            kind=SpanKind.CONSUMER,
            links=telemetry.links_from_metadata(delivery.trace_context),
        ) as span:
            if span.is_recording():
                span.set_attributes(
                    {telemetry.JOB_ID: delivery.job_id, telemetry.JOB_ATTEMPT: delivery.attempts}
                )
            outcome = await self._outcome(delivery)
            if span.is_recording():
                _trace_outcome(span, outcome)
            await self._settle(delivery, outcome)

    async def _outcome(self, delivery: Delivery) -> common_pb2.GenerateResponse | Failure:
        if delivery.attempts > self._config.max_deliveries:
            return Failure(
                "ABORTED",
                f"gave up after {delivery.attempts - 1} deliveries: every worker that took this job "
                "stopped before finishing it",
            )
        return await self._generate(delivery.request)

    async def _settle(self, delivery: Delivery, outcome: common_pb2.GenerateResponse | Failure) -> None:
        """Store the outcome (unless the job already has one) and call back."""
        stored = await self._store(delivery, outcome)
        if stored is None:  # left pending: it is reclaimed and run again later
            return
        if stored:
            counter = self._metrics.failed if isinstance(outcome, Failure) else self._metrics.completed
            counter.inc()
            if delivery.callback_url:
                await self._call_back(delivery)
        else:
            log.info(
                "job %s had already finished (or expired); this run's outcome is dropped", delivery.job_id
            )

    async def _store(self, delivery: Delivery, outcome: common_pb2.GenerateResponse | Failure) -> bool | None:
        """Whether the outcome was stored (False: the job already had one); None if Redis stayed
        unreachable for claim_idle_s. Storing again is safe: the finish script stores once, acks always."""
        delays = _backoff(self._config.retry_backoff_s, MAX_STORE_BACKOFF_S, self._config.claim_idle_s)
        while True:
            try:
                if isinstance(outcome, Failure):
                    return await self._queue.fail(delivery.job_id, delivery.entry_id, *outcome)
                return await self._queue.complete(delivery.job_id, delivery.entry_id, outcome)
            except STORE_ERRORS as error:
                if (delay := next(delays, None)) is None:
                    log.warning("could not store the outcome of job %s: %s", delivery.job_id, error)
                    telemetry.set_error(
                        trace.get_current_span(), f"could not store the outcome: {error}", error
                    )
                    return None
                log.info("could not store the outcome of job %s, retrying: %s", delivery.job_id, error)
            await asyncio.sleep(delay)

    async def _generate(self, request: common_pb2.GenerateRequest) -> common_pb2.GenerateResponse | Failure:
        """One Generate call, retried with backoff for up to retry_for_s while the mesh is unavailable or
        overloaded (the job holds its slot meanwhile: the worker takes no more than the mesh can run)."""
        config = self._config
        delays = _backoff(config.retry_backoff_s, MAX_RETRY_BACKOFF_S, config.retry_for_s)
        while True:
            try:
                return await self._generation.Generate(
                    request,
                    timeout=config.request_timeout_s,
                    metadata=telemetry.metadata_for(trace.get_current_span()),
                )
            except grpc.aio.AioRpcError as error:
                code, details = error.code(), error.details() or error.code().name
                if code not in RETRYABLE:
                    return Failure(code.name, details)
                if (delay := next(delays, None)) is None:
                    return Failure(
                        code.name, f"{details} (still so after retrying for {config.retry_for_s:g} s)"
                    )
                log.info("Generate answered %s, retrying in %.1f s: %s", code.name, delay, details)
            await asyncio.sleep(delay)

    async def _call_back(self, delivery: Delivery) -> None:
        """POST the stored outcome, as GET /v1/async/jobs/{id} shows it, to the job's callback_url;
        retried on connection errors and 5xx answers, never on 4xx."""
        config, url = self._config, delivery.callback_url
        try:
            job = await self._queue.get(delivery.job_id)
        except STORE_ERRORS as error:
            log.warning("job %s: could not read its outcome for the callback: %s", delivery.job_id, error)
            return
        if job is None:
            return
        body = json.dumps(job_to_dict(job)).encode()
        for attempt in range(config.callback_attempts):
            if attempt:
                await asyncio.sleep(config.retry_backoff_s * 2 ** (attempt - 1))
            try:
                await asyncio.to_thread(_post_json, url, body, config.callback_timeout_s)
                return
            except CALLBACK_ERRORS as error:
                tries = f"try {attempt + 1} of {config.callback_attempts}"
                log.warning("job %s: callback to %s failed (%s): %s", delivery.job_id, url, tries, error)
                if isinstance(error, urllib.error.HTTPError) and error.code < 500:
                    return

    async def _keep_entries_fresh(self) -> None:
        """Reset the idle time of running jobs, so a long generation is not reclaimed while alive."""
        while True:
            await asyncio.sleep(self._config.claim_idle_s / 3)
            entry_ids = [delivery.entry_id for delivery in self._inflight.values()]
            try:
                await self._queue.touch(self._config.consumer, entry_ids)
            except STORE_ERRORS as error:
                log.warning("could not refresh running jobs' entries: %s", error)

    async def _report_backlog(self) -> None:
        while True:
            try:
                self._metrics.backlog.set(await self._queue.backlog())
            except STORE_ERRORS as error:
                log.warning("could not read the job backlog: %s", error)
            await asyncio.sleep(self._config.backlog_interval_s)


def _trace_outcome(span: Span, outcome: common_pb2.GenerateResponse | Failure) -> None:
    """The job's gRPC status on its span, which a failure marks failed with the stored message."""
    if isinstance(outcome, Failure):
        telemetry.set_error(span, outcome.message)
        code = grpc.StatusCode.__members__.get(outcome.code, grpc.StatusCode.UNKNOWN)
    else:
        code = grpc.StatusCode.OK
    span.set_attribute("rpc.grpc.status_code", code.value[0])


def _backoff(first_s: float, cap_s: float, for_s: float) -> Iterator[float]:
    """Retry delays doubling from first_s up to cap_s; they end when the next one would end past for_s
    from now (each is drawn when a try has just failed)."""
    give_up_at = time.monotonic() + for_s
    delay = first_s
    while time.monotonic() + delay <= give_up_at:
        yield delay
        delay = min(delay * 2, cap_s)


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx answer is an HTTPError: followed, a 301/302/303 would turn the POST into a bodiless GET."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise urllib.error.HTTPError(
            req.full_url,
            code,
            f"{msg}: redirects are not followed; use {newurl} as callback_url",
            headers,
            fp,
        )


def _post_json(url: str, body: bytes, timeout_s: float) -> None:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json"}
    )
    # the status is the answer (urllib raises HTTPError for any but 2xx); the body is never read, as an
    # endless one (a streaming endpoint given as callback_url) would hold the job's slot for good
    with urllib.request.build_opener(_RefuseRedirects).open(request, timeout=timeout_s):
        pass


async def _sleep_unless(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def serve(config: WorkerConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_on_signals()
    telemetry.configure_tracing("loraplex-worker")
    metrics = WorkerMetrics()
    metrics_server = serve_metrics(config.metrics_port, metrics.registry)
    queue = JobQueue(config.redis_url, config.namespace, ttl_s=config.job_ttl_s)
    try:
        async with grpc.aio.insecure_channel(config.router, options=client_options()) as channel:
            worker = Worker(config, queue, generation_pb2_grpc.GenerationStub(channel), metrics)
            print(
                f"worker {config.consumer} taking jobs for router {config.router} "
                f"(concurrency {config.concurrency})",
                flush=True,
            )
            await worker.run(stop)
    finally:
        await queue.close()
        metrics_server.close()
