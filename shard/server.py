"""Run one shard: load the model, serve the Shard service, heartbeat into the registry and follow its
catalogue."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import redis.exceptions

from loraplex.protos.metrics import DEFAULT_ADAPTER_LABELS, AdapterLabels, serve_metrics
from loraplex.protos.rpc import create_server, set_not_serving, set_serving, stop_on_signals
from loraplex.protos.telemetry import configure_tracing
from loraplex.protos.v1 import shard_pb2, shard_pb2_grpc
from loraplex.registry.adapter_source import IncompatibleAdapter, InvalidAdapter, ModelFit, catalogue_record
from loraplex.registry.records import AdapterRecord, HeldAdapter, ShardRecord
from loraplex.registry.store import AdapterExists, Registry
from loraplex.shard.adapter_store import AdapterStore, DiskCache
from loraplex.shard.catalogue_follower import CatalogueFollower
from loraplex.shard.engine import Engine, EngineConfig
from loraplex.shard.metrics import ShardMetrics
from loraplex.shard.service import ShardService
from loraplex.tools.model_store import resolve_model

log = logging.getLogger("loraplex.shard")
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name


@dataclass(frozen=True)
class ShardConfig:
    shard_id: str
    model: str
    cache_dir: Path
    redis_url: str
    host: str = "127.0.0.1"
    port: int = 50061
    advertise_host: str = ""  # the host the router dials; defaults to `host`
    engine: EngineConfig = field(default_factory=EngineConfig)
    namespace: str = "loraplex"
    heartbeat_interval_s: float = 1.0
    heartbeat_ttl_s: float = 5.0
    max_cpu_adapters: int = 32
    preload: tuple[tuple[str, str], ...] = ()  # (name, source): registered if new, loaded at start
    disk_cache_dir: Path | None = None  # default: <cache_dir>/adapters/<shard_id>
    disk_cache_bytes: int = 10 << 30
    drain_timeout_s: float = 10.0
    catalogue_resync_s: float = 30.0  # full catalogue check besides the change events
    metrics_port: int = 0  # Prometheus /metrics on this port; 0 = off
    metrics_adapter_labels: int = DEFAULT_ADAPTER_LABELS  # adapters with their own label value


class ShardFailed(RuntimeError):
    """The shard could not start (a preloaded adapter is bad) or go on (it lost a tensor-parallel rank,
    or its engine is stuck); it went down cleanly."""


async def serve(config: ShardConfig, stop: asyncio.Event | None = None) -> None:
    """Serve until `stop` is set (or SIGINT/SIGTERM when stop is None). ShardFailed: a preloaded
    adapter is bad and the shard never started, or the engine failed for good (a tensor-parallel rank
    died, or a step ran past its timeout) and the shard has deregistered and stopped."""
    stop = stop or stop_on_signals()
    configure_tracing("loraplex-shard", instance_id=config.shard_id)
    model_dir = await asyncio.to_thread(resolve_model, config.model, config.cache_dir)
    engine = await asyncio.to_thread(Engine, model_dir, config.engine)
    loop = asyncio.get_running_loop()
    engine.on_failure(lambda message: loop.call_soon_threadsafe(stop.set))
    engine.start()
    server, port, health = create_server(f"{config.host}:{config.port}", [SERVICE_NAME])
    address = f"{config.advertise_host or config.host}:{port}"
    disk = DiskCache(
        config.disk_cache_dir or config.cache_dir / "adapters" / config.shard_id, config.disk_cache_bytes
    )
    adapters = AdapterStore(
        engine.load_adapter,
        config.max_cpu_adapters,
        disk,
        on_evict=lambda adapter: engine.drop_adapter(adapter.uid),
    )
    metrics = ShardMetrics(engine, adapters, AdapterLabels(config.metrics_adapter_labels))
    serve_metrics(config.metrics_port, metrics.registry)
    service = ShardService(engine, adapters, config.shard_id, address, model_dir.name, metrics)
    registry = Registry(config.redis_url, config.namespace)
    fit = ModelFit(engine.model.lora_targets(), engine.config.max_lora_rank)
    try:
        await _preload(registry, adapters, config.preload, model_dir.name, fit)
    except BaseException:
        await asyncio.to_thread(engine.stop)
        await registry.close()
        raise
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    await server.start()
    await set_serving(health, [SERVICE_NAME])
    heartbeats = asyncio.create_task(_heartbeat_forever(registry, service, engine, config))
    follower = asyncio.create_task(CatalogueFollower(registry, adapters, config.catalogue_resync_s).run())
    log.info("shard %s serving %s on %s", config.shard_id, model_dir.name, address)
    print(f"shard {config.shard_id} ready on {address}", flush=True)
    try:
        await stop.wait()
    finally:
        if engine.failure:
            log.error("shard %s going down: %s", config.shard_id, engine.failure)
        log.info("shard %s draining", config.shard_id)
        await set_not_serving(health, [SERVICE_NAME])
        service.draining.set()
        heartbeats.cancel()
        follower.cancel()
        try:
            await asyncio.wait_for(registry.remove_shard(config.shard_id), timeout=2)
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            log.warning("could not remove %s from the registry; its heartbeat will expire", config.shard_id)
        # a failed engine has already failed its requests: nothing to drain
        await server.stop(grace=0 if engine.failure else config.drain_timeout_s)
        await asyncio.to_thread(engine.stop)
        await registry.close()
    if engine.failure:
        raise ShardFailed(engine.failure)


async def _preload(
    registry: Registry,
    adapters: AdapterStore,
    preload: tuple[tuple[str, str], ...],
    base_model: str,
    fit: ModelFit,
) -> None:
    """Register each (name, source) unless the catalogue has it already, then load it into memory, so
    the first request finds it warm (TGI's LORA_ADAPTERS). ShardFailed: a bad adapter, or one that does
    not fit this shard's model (checked before it is registered), stops the shard from starting."""
    for name, source in preload:
        try:
            record = await _register(registry, name, source, base_model, fit)
            adapters.release(
                await adapters.acquire(record.source, record.name, record.version, record.checksum)
            )
        except (InvalidAdapter, IncompatibleAdapter) as error:
            raise ShardFailed(f"cannot preload adapter {name!r} from {source}: {error}") from error
        log.info("preloaded adapter %s v%d", record.name, record.version)


async def _register(
    registry: Registry, name: str, source: str, base_model: str, fit: ModelFit
) -> AdapterRecord:
    """The catalogue's record for name: the one registered, else one made from source once it is known
    to fit this shard's model (an adapter that does not is never registered)."""
    wanted = await asyncio.to_thread(catalogue_record, name, source, base_model, fit)
    try:
        return await registry.create_adapter(wanted)
    except AdapterExists:
        record = await registry.get_adapter(name)
        if record.checksum != wanted.checksum:
            log.warning("adapter %s is registered with other weights; serving the registered ones", name)
        return record


def _record(service: ShardService, engine: Engine) -> ShardRecord:
    stats = engine.stats
    return ShardRecord(
        shard_id=service.shard_id,
        address=service.address,
        base_model=service.base_model,
        max_context=engine.max_context,
        max_running_requests=engine.scheduler.max_running_requests,
        running_requests=stats.running_requests,
        waiting_requests=service.waiting_requests(stats),
        queued_tokens=stats.queued_tokens,
        adapters=tuple(HeldAdapter(name, version, tier) for name, version, tier in service.held_adapters()),
        reported_at=stats.taken_at,
        max_lora_rank=engine.config.max_lora_rank,
        num_layers=engine.model_config.num_layers,
        lora_features=tuple((name, *features) for name, features in engine.model.lora_features().items()),
    )


async def _heartbeat_forever(
    registry: Registry, service: ShardService, engine: Engine, config: ShardConfig
) -> None:
    healthy = True
    while True:
        try:
            await registry.heartbeat(_record(service, engine), config.heartbeat_ttl_s)
            if not healthy:
                log.info("registry reachable again")
            healthy = True
        except (redis.exceptions.RedisError, OSError) as error:
            if healthy:
                log.warning("heartbeat failed, will keep trying: %s", error)
            healthy = False
        await asyncio.sleep(config.heartbeat_interval_s)
