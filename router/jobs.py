"""The public Jobs service: queue a generation now, fetch its outcome later.

Submit checks what the router can check at once (the input fields, the sampling parameters' bounds,
the adapter is registered) so an obvious mistake is answered now rather than stored as a failed job;
the rest (the prompt's length against the context) is the shard's to judge when a worker runs the job,
and ends up in the job's error.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

import grpc
import redis.exceptions
from opentelemetry import trace
from opentelemetry.trace import Span

from loraplex.protos import telemetry
from loraplex.protos.rpc import ServiceError, quoted
from loraplex.protos.v1 import common_pb2, jobs_pb2, jobs_pb2_grpc
from loraplex.registry.jobs import JobQueue
from loraplex.router.generation import resolve_adapter
from loraplex.router.snapshot import SnapshotKeeper
from loraplex.shard.request_inputs import check_inputs
from loraplex.shard.sampling_limits import check_sampling, sampling_fields

_UNSENDABLE = re.compile(r"[\x00-\x20\x7f]")  # http.client refuses these anywhere in a URL


class JobsService(jobs_pb2_grpc.JobsServicer):
    def __init__(self, queue: JobQueue, snapshots: SnapshotKeeper) -> None:
        self._queue = queue
        self._snapshots = snapshots
        self._tracer = trace.get_tracer("loraplex.router")

    async def Submit(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> jobs_pb2.SubmitJobResponse:
        """Queue the job in the `router.submit` span, whose context the job keeps: the worker's trace
        for the job links back to it."""
        with telemetry.server_span(self._tracer, "router.submit", context) as span:
            return jobs_pb2.SubmitJobResponse(job_id=await self._queue_job(request, span))

    async def _queue_job(self, request: jobs_pb2.SubmitJobRequest, span: Span) -> str:
        _check_input(request.request)
        _check_sampling(request.request.parameters)
        resolve_adapter(request.request.adapter, self._snapshots.current)
        _check_callback_url(request.callback_url)
        trace_context = telemetry.metadata_for(span)
        job_id = await _call(self._queue.submit(request.request, request.callback_url, trace_context))
        if span.is_recording():
            span.set_attribute(telemetry.JOB_ID, job_id)
        return job_id

    async def Get(self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> jobs_pb2.Job:
        with telemetry.server_span(self._tracer, "router.get_job", context) as span:
            if span.is_recording():
                span.set_attribute(telemetry.JOB_ID, request.job_id)
            if not request.job_id:
                raise ServiceError.invalid("`job_id` is required: the id Jobs/Submit returned")
            job = await _call(self._queue.get(request.job_id))
            if job is None:
                raise ServiceError.not_found(
                    f"job {quoted(request.job_id)} is unknown or expired; a finished job is kept for the "
                    "worker's --job-ttl (24 h by default), then deleted"
                )
            return job


def _check_input(request: common_pb2.GenerateRequest) -> None:
    """The shard's own check of the prompt inputs, run now."""
    try:
        check_inputs(request)
    except ValueError as error:
        raise ServiceError.invalid(str(error)) from error


def _check_sampling(parameters: common_pb2.SamplingParameters) -> None:
    """The shard's bounds, checked now: a job that could only fail is refused rather than queued
    (max_new_tokens is checked against the context when the job runs)."""
    max_new_tokens = parameters.max_new_tokens if parameters.HasField("max_new_tokens") else 1
    try:
        check_sampling(max_new_tokens=max_new_tokens, **sampling_fields(parameters))
    except ValueError as error:
        raise ServiceError.invalid(str(error)) from error


def _check_callback_url(url: str) -> None:
    """Refuse now a callback_url the worker could never POST to, rather than fail its callback after
    the job ran: the worker's HTTP client sends no user:password@, and no space, control character or
    (past the host) non-ASCII character in a request."""
    if not url:
        return
    parsed = urlparse(url)
    try:
        if parsed.port == 0:  # .port raises unless a number in 0..65535
            raise ValueError("port 0 cannot be connected to")
    except ValueError as error:
        raise ServiceError.invalid(f"callback_url {url!r}: {error}") from error
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ServiceError.invalid(f"callback_url {url!r} is not an http(s) URL; leave it empty for none")
    if parsed.username is not None:
        raise ServiceError.invalid(
            f"callback_url {url!r}: user:password@ is not sent; put a token in its path or query instead"
        )
    if _UNSENDABLE.search(url) or not parsed._replace(scheme="", netloc="").geturl().isascii():
        raise ServiceError.invalid(
            f"callback_url {url!r}: percent-encode its spaces, control and non-ASCII characters"
        )


async def _call(operation):
    """Await a queue operation; an unreachable Redis is UNAVAILABLE, which callers may retry."""
    try:
        return await operation
    except (redis.exceptions.RedisError, OSError) as error:
        raise ServiceError.unavailable(
            f"the job queue (Redis) is unreachable, retry later: {error}"
        ) from error
