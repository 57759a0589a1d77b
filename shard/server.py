"""Run one shard: load the model, serve the Shard service, heartbeat into the registry and follow its
catalogue."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis.exceptions

from loraplex.protos.metrics import DEFAULT_ADAPTER_LABELS, AdapterLabels, MetricsServer, serve_metrics
from loraplex.protos.rpc import create_server, set_not_serving, set_serving, stop_on_signals
from loraplex.protos.telemetry import configure_tracing
from loraplex.protos.v1 import shard_pb2, shard_pb2_grpc
from loraplex.registry.adapter_config import IncompatibleAdapter, InvalidAdapter
from loraplex.registry.adapter_source import catalogue_record
from loraplex.registry.adapter_weights import ModelFit
from loraplex.registry.records import AdapterRecord, HeldAdapter, ShardRecord
from loraplex.registry.store import AdapterExists, Registry
from loraplex.shard.adapter_store import AdapterStore, DiskCache
from loraplex.shard.catalogue_follower import REGISTRY_ERRORS, CatalogueFollower
from loraplex.shard.engine import Engine, EngineConfig
from loraplex.shard.metrics import ShardMetrics
from loraplex.shard.service import ShardService
from loraplex.tools.model_store import resolve_model

log = logging.getLogger("loraplex.shard")
SERVICE_NAME = shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name
FAILURE_DELIVERY_S = 1.0  # for the last messages of requests the drain cut off to reach their callers


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
    _check_preload_names(config.preload)
    configure_tracing("loraplex-shard", instance_id=config.shard_id)
    # bind before the model loads: a taken port fails the start at once, not minutes later
    server, port, health = create_server(f"{config.host}:{config.port}", [SERVICE_NAME])
    address = f"{config.advertise_host or config.host}:{port}"
    model_dir = await asyncio.to_thread(resolve_model, config.model, config.cache_dir)
    engine = await asyncio.to_thread(Engine, model_dir, config.engine)
    loop = asyncio.get_running_loop()
    engine.on_failure(lambda message: loop.call_soon_threadsafe(stop.set))
    engine.start()
    registry = Registry(config.redis_url, config.namespace)
    metrics_server = MetricsServer()
    try:  # whatever fails from here on (a bad preload, a taken metrics port) stops the engine first
        disk = DiskCache(
            config.disk_cache_dir or config.cache_dir / "adapters" / config.shard_id,
            config.disk_cache_bytes,
        )
        adapters = AdapterStore(
            engine.load_adapter,
            config.max_cpu_adapters,
            disk,
            on_evict=lambda adapter: engine.drop_adapter(adapter.uid),
        )
        metrics = ShardMetrics(engine, adapters, AdapterLabels(config.metrics_adapter_labels))
        metrics_server = serve_metrics(config.metrics_port, metrics.registry)
        service = ShardService(engine, adapters, config.shard_id, address, model_dir.name, metrics)
        fit = ModelFit(engine.model.lora_targets(), engine.config.max_lora_rank)
        wanted = [
            await _checked_preload(name, source, model_dir.name, fit) for name, source in config.preload
        ]
        unregistered = await _preload(registry, adapters, wanted)
    except BaseException:
        metrics_server.close()
        await asyncio.to_thread(engine.stop)
        await registry.close()
        raise
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    await server.start()
    await set_serving(health, [SERVICE_NAME])
    heartbeats = asyncio.create_task(_heartbeat_forever(registry, service, engine, config))
    follower = asyncio.create_task(CatalogueFollower(registry, adapters, config.catalogue_resync_s).run())
    preloads = asyncio.create_task(
        _preload_when_reachable(registry, adapters, unregistered, config.heartbeat_interval_s)
    )
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
        for task in (heartbeats, follower, preloads):
            task.cancel()
        try:
            await asyncio.wait_for(registry.remove_shard(config.shard_id), timeout=2)
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            log.warning("could not remove %s from the registry; its heartbeat will expire", config.shard_id)
        await _drain(server, service, engine, config.drain_timeout_s)  # stops the engine too
        # waited for, so each ends here (the follower closes its subscription) rather than being
        # destroyed still pending when the loop closes; after the drain, whose time counts from the stop
        await asyncio.wait((heartbeats, follower, preloads), timeout=5)
        metrics_server.close()
        await registry.close()
    if engine.failure:
        raise ShardFailed(engine.failure)


async def _drain(server: grpc.aio.Server, service: ShardService, engine: Engine, timeout_s: float) -> None:
    """Let the requests in flight finish, for up to timeout_s, then stop the engine and the server; what
    is still running then ends UNAVAILABLE. The port stays open meanwhile, so health checks read
    NOT_SERVING (new requests are refused). A failed engine has already failed its requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (0 if engine.failure else timeout_s)
    while service.outstanding_requests() and loop.time() < deadline and not engine.failure:
        await asyncio.sleep(0.05)
    # the engine fails what is left, UNAVAILABLE saying why, before the server cuts the calls off
    await asyncio.to_thread(engine.stop)
    await server.stop(grace=FAILURE_DELIVERY_S)


def _check_preload_names(preload: tuple[tuple[str, str], ...]) -> None:
    """ShardFailed for a name listed twice: only one of its sources could be served."""
    sources: dict[str, str] = {}
    for name, source in preload:
        if name in sources:
            raise ShardFailed(
                f"adapter {name!r} is listed twice to preload ({sources[name]} and {source}); "
                "give each adapter one name=path entry"
            )
        sources[name] = source


async def _checked_preload(name: str, source: str, base_model: str, fit: ModelFit) -> AdapterRecord:
    """The catalogue record for a preload entry, read from its source and checked against this shard's
    model (no registry needed). ShardFailed names a bad entry: the shard does not start. A relative
    path is this shard's, so it is registered made absolute, as every other process must read it."""
    if "://" not in source and not Path(source).expanduser().is_absolute():
        source = str(Path(source).expanduser().absolute())
    try:
        return await asyncio.to_thread(catalogue_record, name, source, base_model, fit)
    except (InvalidAdapter, IncompatibleAdapter) as error:
        raise ShardFailed(f"cannot preload adapter {name!r} from {source}: {error}") from error


async def _preload(
    registry: Registry, adapters: AdapterStore, wanted: list[AdapterRecord]
) -> list[AdapterRecord]:
    """Register and load each checked record (`_preload_one`) at start-up. Returns those not done
    because the registry is unreachable: the shard starts without them and finishes them later."""
    for index, record in enumerate(wanted):
        try:
            await _preload_one(registry, adapters, record)
        except REGISTRY_ERRORS as error:
            log.warning(
                "registry unreachable (%s): adapters %s will be registered and loaded once it answers",
                error,
                ", ".join(pending.name for pending in wanted[index:]),
            )
            return wanted[index:]
    return []


async def _preload_when_reachable(
    registry: Registry, adapters: AdapterStore, unregistered: list[AdapterRecord], retry_s: float
) -> None:
    """Finish a preload that the registry's absence interrupted at start-up; meanwhile the shard
    serves the base model and the adapters already registered."""
    while unregistered:
        await asyncio.sleep(retry_s)
        try:
            await _preload_one(registry, adapters, unregistered[0])
        except REGISTRY_ERRORS:
            continue
        except ShardFailed as error:  # too late to refuse to start: serve the others
            log.error("%s", error)
        unregistered = unregistered[1:]


async def _preload_one(registry: Registry, adapters: AdapterStore, wanted: AdapterRecord) -> None:
    """Register the record unless the catalogue has its name already, then load the registered
    version into memory, so the first request finds it warm (TGI's LORA_ADAPTERS). ShardFailed: the
    registered version (other weights, registered earlier) cannot be loaded here."""
    record = await _register(registry, wanted)
    try:
        adapters.release(await adapters.acquire(record.source, record.name, record.version, record.checksum))
    except (InvalidAdapter, IncompatibleAdapter, OSError) as error:  # OSError: not the registry's
        raise ShardFailed(
            f"cannot preload adapter {record.name!r} from {record.source} (its registered source): {error}"
        ) from error
    log.info("preloaded adapter %s v%d", record.name, record.version)


async def _register(registry: Registry, wanted: AdapterRecord) -> AdapterRecord:
    """The catalogue's record for the wanted one's name: the one registered, else the wanted one."""
    try:
        return await registry.create_adapter(wanted)
    except AdapterExists:
        record = await registry.get_adapter(wanted.name)
        if record.checksum != wanted.checksum:
            log.warning(
                "adapter %s is registered with other weights (from %s); serving the registered ones, not %s",
                wanted.name,
                record.source,
                wanted.source,
            )
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
        except REGISTRY_ERRORS as error:
            if healthy:
                log.warning("heartbeat failed, will keep trying: %s", error)
            healthy = False
        except Exception:  # a bug: the shard must not leave the membership while it still serves
            if healthy:
                log.exception("heartbeat failed unexpectedly, will keep trying")
            healthy = False
        await asyncio.sleep(config.heartbeat_interval_s)
