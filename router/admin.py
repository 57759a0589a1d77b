"""The Adapters admin service: validates a source, then writes the catalogue atomically."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import redis.exceptions
from opentelemetry import trace
from opentelemetry.trace import Span

from loraplex.protos import telemetry
from loraplex.protos.rpc import ServiceError
from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2
from loraplex.registry.adapter_config import IncompatibleAdapter, InvalidAdapter
from loraplex.registry.adapter_source import catalogue_record, validate_name
from loraplex.registry.adapter_weights import ModelFit
from loraplex.registry.records import AdapterRecord
from loraplex.registry.store import AdapterExists, AdapterNotFound, Registry
from loraplex.router.convert import adapter_to_pb
from loraplex.router.snapshot import SnapshotKeeper


class AdaptersService(adapters_pb2_grpc.AdaptersServicer):
    def __init__(self, registry: Registry, snapshots: SnapshotKeeper, base_model: str) -> None:
        self._registry = registry
        self._snapshots = snapshots
        self._base_model = base_model
        self._tracer = trace.get_tracer("loraplex.router")

    async def Create(self, request: adapters_pb2.CreateAdapterRequest, context) -> common_pb2.Adapter:
        with self._span("create", request.name, context):
            _require_name(request.name)
            record = await self._record_from_source(request.name, request.source, request.base_model)
            created = await self._call(self._registry.create_adapter(record))
            self._snapshots.put_adapter(created)
            return adapter_to_pb(created)

    async def Update(self, request: adapters_pb2.UpdateAdapterRequest, context) -> common_pb2.Adapter:
        with self._span("update", request.name, context):
            _require_name(request.name)
            current = await self._call(self._registry.get_adapter(request.name), reads=True)
            record = await self._record_from_source(request.name, request.source, current.base_model)
            updated = await self._call(self._registry.update_adapter(record))
            self._snapshots.put_adapter(updated)
            return adapter_to_pb(updated)

    async def Delete(self, request: adapters_pb2.DeleteAdapterRequest, context) -> common_pb2.Adapter:
        with self._span("delete", request.name, context):
            _require_name(request.name)
            deleted = await self._call(self._registry.delete_adapter(request.name))
            self._snapshots.drop_adapter(deleted)
            return adapter_to_pb(deleted)

    async def Get(self, request: adapters_pb2.GetAdapterRequest, context) -> common_pb2.Adapter:
        with self._span("get", request.name, context):
            _require_name(request.name)
            record = await self._call(self._registry.get_adapter(request.name), reads=True)
            return adapter_to_pb(record, self._snapshots.current.shards)

    async def List(
        self, request: adapters_pb2.ListAdaptersRequest, context
    ) -> adapters_pb2.ListAdaptersResponse:
        with self._span("list", "", context):
            records = await self._call(self._registry.list_adapters(), reads=True)
            shards = self._snapshots.current.shards
            return adapters_pb2.ListAdaptersResponse(
                adapters=[
                    adapter_to_pb(record, shards)
                    for record in records
                    if not request.base_model or record.base_model == request.base_model
                ]
            )

    @contextmanager
    def _span(self, action: str, name: str, context: grpc.aio.ServicerContext) -> Iterator[Span]:
        """The call's `router.adapters.<action>` span, naming the adapter it acts on."""
        with telemetry.server_span(self._tracer, f"router.adapters.{action}", context) as span:
            if name and span.is_recording():
                span.set_attribute(telemetry.ADAPTER, name)
            yield span

    async def _record_from_source(self, name: str, source: str, base_model: str) -> AdapterRecord:
        if not source:
            raise ServiceError.invalid("`source` is required: a local path or file:// URI of a PEFT adapter")
        base_model = base_model or self._base_model
        if base_model != self._base_model:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"adapter base model {base_model!r} differs from the mesh's base model {self._base_model!r}",
            )
        try:
            return await asyncio.to_thread(catalogue_record, name, source, base_model, self._live_model_fit())
        except InvalidAdapter as error:
            raise ServiceError.invalid(str(error)) from error
        except IncompatibleAdapter as error:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from error
        except OSError as error:  # a path the router may not read, or too long: not this server's bug
            raise ServiceError.invalid(
                f"the router cannot read `source`: {error.strerror or error}; give a path (or file:// URI) "
                "that the router and every shard can read"
            ) from error

    def _live_model_fit(self) -> ModelFit | None:
        """What the live shards publish of their model and rank limit (None while none has): an adapter
        no shard could load is refused here rather than on its first request."""
        shards = [
            s for s in self._snapshots.current.shards if s.base_model == self._base_model and s.lora_features
        ]
        if not shards:
            return None
        limits = [shard.max_lora_rank for shard in shards]
        return ModelFit.per_layer(
            {
                name: (in_features, out_features)
                for name, in_features, out_features in shards[0].lora_features
            },
            shards[0].num_layers,
            max_rank=max(limits) if all(limits) else 0,
            limit_name="the live shards' largest --max-lora-rank",
        )

    @staticmethod
    async def _call(operation, reads: bool = False):
        """Await a registry operation, mapping its failures to the status codes callers act on; a
        write that timed out may yet land, which its caller is told (a read's is not)."""
        try:
            return await operation
        except AdapterExists as error:
            raise ServiceError(grpc.StatusCode.ALREADY_EXISTS, error.args[0]) from error
        except AdapterNotFound as error:
            raise ServiceError.not_found(error.args[0]) from error
        except (redis.exceptions.TimeoutError, TimeoutError) as error:
            advice = (
                "retry later"
                if reads
                else "the change may still be applied when it recovers, so check with Get before retrying"
            )
            raise ServiceError.unavailable(
                f"the registry (Redis) did not answer in time: {error}; {advice}"
            ) from error
        except (redis.exceptions.RedisError, OSError) as error:
            raise ServiceError.unavailable(
                f"the registry (Redis) is unreachable: {error}; retry later"
            ) from error


def _require_name(name: str) -> None:
    """INVALID_ARGUMENT for a name no adapter can have (none was ever registered outside the pattern)."""
    if not name:
        raise ServiceError.invalid("`name` is required: the adapter's name in the catalogue")
    try:
        validate_name(name)
    except InvalidAdapter as error:
        raise ServiceError.invalid(str(error)) from error
