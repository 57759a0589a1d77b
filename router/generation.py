"""The public Generation service: resolve the adapter, pick a shard, stream its tokens back.

A shard that fails before its first token has the request retried on the next candidate; once
tokens have streamed, the caller gets UNAVAILABLE, since replaying would duplicate text. When every
candidate is saturated (outstanding requests at `saturation_factor` x its batch capacity: a full
batch running and more queued) the caller gets RESOURCE_EXHAUSTED rather than a place in a queue
that only grows.

Tracing: the request's span (continuing the caller's trace) has a child for the routing decision and
one per forward to a shard, each attempt its own; the shard's spans hang under its forward.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from loraplex.protos import telemetry
from loraplex.protos.rpc import ServiceError, quoted
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc, shard_pb2
from loraplex.registry.records import AdapterRecord, ShardRecord
from loraplex.router.channels import ShardChannels
from loraplex.router.convert import adapter_to_pb, collect_response
from loraplex.router.metrics import RouterMetrics
from loraplex.router.placement import DEFAULT_CAPACITY_FACTOR, DEFAULT_SATURATION_FACTOR, Placement, place
from loraplex.router.snapshot import RoutingSnapshot, SnapshotKeeper

log = logging.getLogger("loraplex.router")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
FINISH_REASONS = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_EOS: "eos",
}
TRACED_CANDIDATES = 8  # candidate shards named on the routing span; the count says how many in all


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        snapshots: SnapshotKeeper,
        channels: ShardChannels,
        suspect_for_s: float,
        capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
        saturation_factor: float = DEFAULT_SATURATION_FACTOR,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._snapshots = snapshots
        self._channels = channels
        self._suspect_for_s = suspect_for_s
        self._capacity_factor = capacity_factor
        self._saturation_factor = saturation_factor
        self._tracer = trace.get_tracer("loraplex.router")

    async def GenerateStream(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        async for chunk in self._timed(request, context):
            yield chunk

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.GenerateResponse:
        return await collect_response(self._timed(request, context))

    async def _timed(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        """_forward in the request's span, counted and timed when metrics are on."""
        span = self._tracer.start_span(
            "router.generate",
            context=telemetry.context_from_metadata(context.invocation_metadata()),
            kind=SpanKind.SERVER,
        )
        timer = None
        if self._metrics is not None:
            registered = not request.adapter or request.adapter in self._snapshots.current.adapters
            timer = self._metrics.request(request.adapter, registered)
        code = "CANCELLED"
        try:
            async for chunk in self._forward(request, context, span):
                if timer is not None:
                    timer.chunk()
                yield chunk
            code = "OK"
        except ServiceError as error:
            code = error.code.name
            telemetry.set_error(span, error.message)
            raise
        except Exception as error:
            code = "INTERNAL"
            telemetry.set_error(span, str(error), error)
            raise
        except BaseException:  # cancelled: the caller left, or gRPC ended the call at its deadline
            if telemetry.stopped_by_deadline(context.time_remaining()):
                code = "DEADLINE_EXCEEDED"
                telemetry.set_error(span, "the caller's deadline passed")
            raise
        finally:
            if timer is not None:
                timer.done(code)
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
            span.end()

    def _route(
        self, request: common_pb2.GenerateRequest, parent: Span
    ) -> tuple[AdapterRecord | None, tuple[ShardRecord, ...]]:
        """The adapter's record and the shards to try, best first, in the routing decision's span;
        raises when no shard can take the request."""
        span = telemetry.start_child(self._tracer, "router.route", parent)
        try:
            snapshot = self._snapshots.current
            adapter = resolve_adapter(request.adapter, snapshot)
            too_small = _below_rank(adapter, snapshot.shards)
            if too_small and len(too_small) == len(snapshot.shards):
                raise ServiceError(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"adapter {request.adapter!r} has rank {adapter.rank}, above every live shard's "
                    "max_lora_rank; start a shard with a larger --max-lora-rank",
                )
            placement = place(
                request.adapter,
                snapshot.shards,
                excluded=self._snapshots.suspects() | too_small,
                inflight=self._snapshots.inflight.corrections,
                capacity_factor=self._capacity_factor,
                saturation_factor=self._saturation_factor,
                version=adapter.version if adapter is not None else 0,
            )
            if span.is_recording():
                span.set_attributes(_route_attributes(request.adapter, adapter, placement))
            if self._metrics is not None:
                self._metrics.decisions.labels(placement.reason).inc()
            candidates = placement.shards
            if not candidates and snapshot.shards:
                raise ServiceError.unavailable(
                    f"all {len(snapshot.shards)} live shards are left out: calls to them failed in the "
                    f"last {self._suspect_for_s:g} s, or the adapter's rank is above their limit; "
                    "retry shortly"
                )
            if not candidates:
                raise ServiceError.unavailable(
                    "no live shard is registered; start a shard or wait for one to join"
                )
            if all(self._saturated(shard) for shard in candidates):
                raise ServiceError.resource_exhausted(
                    f"all {len(candidates)} shards are saturated (a full batch running and as many "
                    "queued); retry with backoff, or add shards"
                )
            return adapter, candidates
        except ServiceError as error:
            telemetry.set_error(span, error.message)
            raise
        finally:
            span.end()

    async def _forward(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext, parent: Span
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        adapter, candidates = self._route(request, parent)
        shard_request = shard_pb2.ShardGenerateRequest(request=request)
        if adapter is not None:
            shard_request.adapter.CopyFrom(adapter_to_pb(adapter))
        inflight = self._snapshots.inflight
        failures = []
        for attempt, shard in enumerate(candidates, 1):
            span = telemetry.start_child(self._tracer, "router.forward", parent, kind=SpanKind.CLIENT)
            if span.is_recording():
                span.set_attributes(
                    {
                        telemetry.SHARD: shard.shard_id,
                        "server.address": shard.address,
                        "loraplex.attempt": attempt,
                    }
                )
            call = self._channels.stream(shard.address).generate(
                shard_request, context.time_remaining(), telemetry.metadata_for(span)
            )
            streamed = 0
            started_at = inflight.started(shard.shard_id)
            try:
                async with aclosing(call.chunks()) as chunks:
                    async for chunk in chunks:
                        streamed += 1
                        if chunk.finish_reason:
                            chunk.served_by.shard = shard.shard_id
                            if adapter is not None:
                                chunk.served_by.adapter = adapter.name
                                chunk.served_by.adapter_version = adapter.version
                            if parent.is_recording():
                                parent.set_attributes(_served_attributes(chunk))
                        yield chunk
                return
            except ServiceError as error:
                telemetry.set_error(span, f"{error.code.name}: {error.message}")
                if error.code not in RETRYABLE:
                    raise
                self._snapshots.mark_suspect(shard.shard_id, self._suspect_for_s)
                if streamed:
                    raise ServiceError.unavailable(
                        f"shard {shard.shard_id} failed after {streamed} chunks had streamed: "
                        f"{error.message}; retry the request"
                    ) from error
                retrying = attempt < len(candidates)
                log.warning(
                    "shard %s failed before its first token, %s: %s",
                    shard.shard_id,
                    "trying the next" if retrying else "no other shard to try",
                    error.message,
                )
                failures.append(f"{shard.shard_id}: {error.message}")
                if self._metrics is not None and retrying:
                    self._metrics.failovers.inc()
            finally:
                inflight.finished(shard.shard_id, started_at)
                if call.outstanding_requests is not None:
                    inflight.reported(shard.shard_id, call.outstanding_requests)
                span.end()
        raise ServiceError.unavailable(f"every candidate shard failed: {'; '.join(failures)}")

    def _saturated(self, shard: ShardRecord) -> bool:
        outstanding = shard.running_requests + shard.waiting_requests
        outstanding += self._snapshots.inflight.corrections.get(shard.shard_id, 0)
        return outstanding >= self._saturation_factor * max(1, shard.max_running_requests)


def _route_attributes(name: str, adapter: AdapterRecord | None, placement: Placement) -> dict:
    shard_ids = [shard.shard_id for shard in placement.shards]
    return {
        telemetry.ADAPTER: name,
        telemetry.ADAPTER_VERSION: adapter.version if adapter else 0,
        telemetry.SHARD: shard_ids[0] if shard_ids else "",
        "loraplex.route.reason": placement.reason,
        "loraplex.route.candidates": shard_ids[:TRACED_CANDIDATES],
        "loraplex.route.num_candidates": len(shard_ids),
    }


def _served_attributes(chunk: common_pb2.GenerateStreamResponse) -> dict:
    return {
        telemetry.ADAPTER: chunk.served_by.adapter,
        telemetry.ADAPTER_VERSION: chunk.served_by.adapter_version,
        telemetry.SHARD: chunk.served_by.shard,
        telemetry.PROMPT_TOKENS: chunk.usage.prompt_tokens,
        telemetry.COMPLETION_TOKENS: chunk.usage.completion_tokens,
        telemetry.FINISH_REASONS: [FINISH_REASONS.get(chunk.finish_reason, "unknown")],
    }


def _below_rank(adapter: AdapterRecord | None, shards: tuple[ShardRecord, ...]) -> set[str]:
    """The shards whose published rank limit the adapter exceeds: they would refuse to load it, so
    placement leaves them out (shards that publish no limit are kept)."""
    if adapter is None:
        return set()
    return {shard.shard_id for shard in shards if 0 < shard.max_lora_rank < adapter.rank}


def resolve_adapter(name: str, snapshot: RoutingSnapshot) -> AdapterRecord | None:
    """The catalogue record a request names (None for the base model); NOT_FOUND if unregistered,
    UNAVAILABLE while this router has never read the catalogue (Redis was down since it started)."""
    if not name:
        return None
    if name in snapshot.adapters:
        return snapshot.adapters[name]
    if not snapshot.taken_at:
        raise ServiceError.unavailable(
            f"cannot tell whether adapter {quoted(name)} is registered: this router has not yet read the "
            "registry (is Redis reachable?); retry shortly"
        )
    raise ServiceError.not_found(
        f"adapter {quoted(name)} is not registered; list adapters with Adapters/List "
        "(`loraplex adapters ls`) or leave `adapter` empty for the base model"
    )
