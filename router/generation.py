"""The public Generation service: resolve the adapter, pick a shard, stream its tokens back.

A shard that fails before its first token has the request retried on the next candidate; once
tokens have streamed, the caller gets UNAVAILABLE, since replaying would duplicate text. When every
candidate is saturated (outstanding requests at `saturation_factor` x its batch capacity: a full
batch running and more queued) the caller gets RESOURCE_EXHAUSTED rather than a place in a queue
that only grows.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc

from loraplex.protos.rpc import ServiceError
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc, shard_pb2
from loraplex.registry.records import AdapterRecord, ShardRecord
from loraplex.router.channels import ShardChannels
from loraplex.router.convert import adapter_to_pb
from loraplex.router.metrics import RouterMetrics
from loraplex.router.placement import DEFAULT_CAPACITY_FACTOR, place
from loraplex.router.snapshot import SnapshotKeeper

log = logging.getLogger("loraplex.router")
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class GenerationService(generation_pb2_grpc.GenerationServicer):
    def __init__(
        self,
        snapshots: SnapshotKeeper,
        channels: ShardChannels,
        suspect_for_s: float,
        capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
        saturation_factor: float = 2.0,
        metrics: RouterMetrics | None = None,
    ) -> None:
        self._metrics = metrics
        self._snapshots = snapshots
        self._channels = channels
        self._suspect_for_s = suspect_for_s
        self._capacity_factor = capacity_factor
        self._saturation_factor = saturation_factor

    async def GenerateStream(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        async for chunk in self._timed(request, context):
            yield chunk

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> common_pb2.GenerateResponse:
        response = common_pb2.GenerateResponse()
        texts = []
        async for chunk in self._timed(request, context):
            texts.append(chunk.text)
            response.tokens.extend(chunk.tokens)
            response.prefill_tokens.extend(chunk.prefill_tokens)
            response.request_id = chunk.request_id
            if chunk.finish_reason:
                response.finish_reason = chunk.finish_reason
                response.usage.CopyFrom(chunk.usage)
                response.served_by.CopyFrom(chunk.served_by)
        response.text = "".join(texts)
        return response

    async def _timed(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        """_forward, counted and timed when metrics are on."""
        if self._metrics is None:
            async for chunk in self._forward(request, context):
                yield chunk
            return
        registered = not request.adapter or request.adapter in self._snapshots.current.adapters
        timer = self._metrics.request(request.adapter, registered)
        code = "CANCELLED"
        try:
            async for chunk in self._forward(request, context):
                timer.chunk()
                yield chunk
            code = "OK"
        except ServiceError as error:
            code = error.code.name
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            timer.done(code)

    async def _forward(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        snapshot = self._snapshots.current
        adapter = resolve_adapter(request.adapter, snapshot.adapters)
        shard_request = shard_pb2.ShardGenerateRequest(request=request)
        if adapter is not None:
            shard_request.adapter.CopyFrom(adapter_to_pb(adapter))
        inflight = self._snapshots.inflight
        placement = place(
            request.adapter,
            snapshot.shards,
            excluded=self._snapshots.suspects(),
            inflight=inflight.corrections,
            capacity_factor=self._capacity_factor,
        )
        if self._metrics is not None:
            self._metrics.decisions.labels(placement.reason).inc()
        candidates = placement.shards
        if not candidates:
            raise ServiceError.unavailable(
                "no live shard is registered; start a shard or wait for one to join"
            )
        if all(self._saturated(shard) for shard in candidates):
            raise ServiceError.resource_exhausted(
                f"all {len(candidates)} shards are saturated (a full batch running and as many queued); "
                "retry with backoff, or add shards"
            )
        failures = []
        for shard in candidates:
            call = self._channels.stub(shard.address).Generate(
                shard_request, timeout=context.time_remaining()
            )
            streamed = 0
            started_at = inflight.started(shard.shard_id)
            try:
                async for chunk in call:
                    streamed += 1
                    if chunk.finish_reason:
                        chunk.served_by.shard = shard.shard_id
                        if adapter is not None:
                            chunk.served_by.adapter = adapter.name
                            chunk.served_by.adapter_version = adapter.version
                    yield chunk
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in RETRYABLE:
                    raise ServiceError.from_rpc_error(error) from error
                self._snapshots.mark_suspect(shard.shard_id, self._suspect_for_s)
                if streamed:
                    raise ServiceError.unavailable(
                        f"shard {shard.shard_id} failed after {streamed} chunks had streamed: "
                        f"{error.details()}; retry the request"
                    ) from error
                log.warning(
                    "shard %s failed before its first token, trying the next: %s",
                    shard.shard_id,
                    error.details(),
                )
                failures.append(f"{shard.shard_id}: {error.details()}")
                if self._metrics is not None:
                    self._metrics.failovers.inc()
            finally:
                call.cancel()
                inflight.finished(shard.shard_id, started_at)
        raise ServiceError.unavailable(f"every candidate shard failed: {'; '.join(failures)}")

    def _saturated(self, shard: ShardRecord) -> bool:
        outstanding = shard.running_requests + shard.waiting_requests
        outstanding += self._snapshots.inflight.corrections.get(shard.shard_id, 0)
        return outstanding >= self._saturation_factor * max(1, shard.max_running_requests)


def resolve_adapter(name: str, adapters: dict[str, AdapterRecord]) -> AdapterRecord | None:
    """The catalogue record a request names (None for the base model); NOT_FOUND if unregistered."""
    if not name:
        return None
    if name not in adapters:
        raise ServiceError.not_found(
            f"adapter {name!r} is not registered; list adapters with Adapters/List "
            "(`loraplex adapters ls`) or leave `adapter` empty for the base model"
        )
    return adapters[name]
