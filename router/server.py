"""Run one router: the Generation, Adapters and Jobs services over a registry snapshot."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from loraplex.protos.metrics import DEFAULT_ADAPTER_LABELS, AdapterLabels, MetricsServer, serve_metrics
from loraplex.protos.rpc import KEEPALIVE_S, create_server, set_not_serving, set_serving, stop_on_signals
from loraplex.protos.telemetry import configure_tracing
from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from loraplex.registry.jobs import JobQueue
from loraplex.registry.store import Registry
from loraplex.router.admin import AdaptersService
from loraplex.router.channels import ShardChannels
from loraplex.router.generation import GenerationService
from loraplex.router.jobs import JobsService
from loraplex.router.metrics import RouterMetrics
from loraplex.router.placement import DEFAULT_CAPACITY_FACTOR, DEFAULT_SATURATION_FACTOR
from loraplex.router.snapshot import SnapshotKeeper

log = logging.getLogger("loraplex.router")
SERVICE_NAMES = [
    generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
    jobs_pb2.DESCRIPTOR.services_by_name["Jobs"].full_name,
]


@dataclass(frozen=True)
class RouterConfig:
    redis_url: str
    base_model: str
    host: str = "127.0.0.1"
    port: int = 50051
    namespace: str = "loraplex"
    refresh_interval_s: float = 1.0
    suspect_for_s: float = 5.0  # how long a shard that refused a connection is avoided
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR  # bounded loads: no shard above c x the mean load
    # a shard with this x its batch outstanding is saturated; RESOURCE_EXHAUSTED once every shard is
    saturation_factor: float = DEFAULT_SATURATION_FACTOR
    drain_timeout_s: float = 10.0
    shard_keepalive_s: float = KEEPALIVE_S  # a shard silent this long is pinged; no answer: it is gone
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    metrics_adapter_labels: int = DEFAULT_ADAPTER_LABELS  # adapters with their own label value


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    stop = stop or stop_on_signals()
    configure_tracing("loraplex-router")
    registry = Registry(config.redis_url, config.namespace)
    snapshots = SnapshotKeeper(registry, config.refresh_interval_s)
    await snapshots.start()
    channels = ShardChannels(keepalive_s=config.shard_keepalive_s)
    metrics = RouterMetrics(snapshots, AdapterLabels(config.metrics_adapter_labels))
    jobs = JobQueue(config.redis_url, config.namespace)
    metrics_server = MetricsServer()
    try:  # a taken port (metrics or gRPC) ends the start with nothing left running
        metrics_server = serve_metrics(config.metrics_port, metrics.registry)
        server, port, health = create_server(f"{config.host}:{config.port}", SERVICE_NAMES)
    except BaseException:
        metrics_server.close()
        await snapshots.stop()
        raise
    generation_pb2_grpc.add_GenerationServicer_to_server(
        GenerationService(
            snapshots,
            channels,
            config.suspect_for_s,
            config.capacity_factor,
            config.saturation_factor,
            metrics,
        ),
        server,
    )
    adapters_pb2_grpc.add_AdaptersServicer_to_server(
        AdaptersService(registry, snapshots, config.base_model), server
    )
    jobs_pb2_grpc.add_JobsServicer_to_server(JobsService(jobs, snapshots), server)
    await server.start()
    await set_serving(health, SERVICE_NAMES)
    print(f"router ready on {config.host}:{port}", flush=True)
    try:
        await stop.wait()
    finally:
        await set_not_serving(health, SERVICE_NAMES)
        await server.stop(grace=config.drain_timeout_s)
        await snapshots.stop()
        await channels.close()
        metrics_server.close()
        await jobs.close()
        await registry.close()
