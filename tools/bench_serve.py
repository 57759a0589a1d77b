"""`loraplex bench serve`: an open-loop workload through a mesh's Generation service, adapters vs the
base model on the same requests, at one or more offered rates; JSON + PNG.

Requests are sent at their planned times whatever the mesh's state (open loop, as real clients arrive),
so a mesh slower than the offered rate shows it as growing TTFT, not as a quietly lower rate. Each rate
runs the same requests twice, once naming their adapters and once the bare base model, in alternating
order from rate to rate so that slow drifts of a shared machine fall on both; every run fills its
prompts with words of its own, so that none is served from another's prefix cache. Against a running mesh
(`--router`) the adapters are the ones registered there; without it the bench starts a private mesh
(redis-server, shards and a router on this machine) and registers random-weight adapters of its own.
`--shard ADDRESS` (a running mesh's shard) or `--direct` (the private mesh's first shard) sends the
requests straight to one shard's internal Generate, each with its adapter's catalogue record as the
router would hand it: the same workload without the router's hop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import grpc

from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    shard_pb2,
    shard_pb2_grpc,
)
from loraplex.tools.bench_serve_report import (
    RequestResult,
    ServeRun,
    build_report,
    summary_table,
    write_report,
)
from loraplex.tools.local_mesh import Mesh, start_mesh
from loraplex.tools.processes import start_private_redis, stop_all
from loraplex.tools.workload import ARRIVALS, MIXES, PlannedRequest, WorkloadSpec, base_only, plan

ADAPTER_PREFIX = "bench-serve-"  # names of the adapters a private mesh registers
WARMUP_CONCURRENCY = 8

# one generation's chunks, from whatever the bench drives: (request, timeout_s) -> stream
Stream = Callable[[common_pb2.GenerateRequest, float], AsyncIterator[common_pb2.GenerateStreamResponse]]


@dataclass(frozen=True)
class PrivateMesh:
    """What the bench starts when no --router is given."""

    model_dir: Path
    num_shards: int = 1
    shard_args: tuple[str, ...] = ()  # passed to every shard, e.g. ("--max-gpu-adapters", "16")
    ranks: tuple[int, ...] = (8, 16)  # adapter i gets ranks[i % len(ranks)]
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    redis_url: str | None = None  # default: a private redis-server


@dataclass(frozen=True)
class ServeBenchConfig:
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)  # its rate is replaced by each of rates
    rates: tuple[float, ...] = (1.0, 2.0, math.inf)
    router: str | None = None  # a running mesh; None: start private_mesh
    private_mesh: PrivateMesh | None = None
    adapter_names: tuple[str, ...] = ()  # with router: these registered adapters (default: all)
    shard: str | None = None  # with router: send straight to this shard of the mesh, not the router
    direct: bool = False  # private mesh: send straight to its first shard, not the router
    slo_ttft_ms: float = 2000.0
    slo_tpot_ms: float = 200.0
    warmup: bool = True  # one short request per adapter used, before the measured runs
    request_timeout_s: float = 600.0
    output_dir: Path = Path("bench/results")


@dataclass(frozen=True)
class Target:
    """Where the requests go: the router, or one shard (then with the records the router hands it)."""

    router: str  # also the catalogue's front: the adapters' names and records come from it
    adapter_names: tuple[str, ...]
    shard: str | None = None


@dataclass(frozen=True)
class ServeBenchResult:
    report: dict
    json_path: Path
    png_path: Path


def run_serve_bench(config: ServeBenchConfig) -> ServeBenchResult:
    started = datetime.now().astimezone()
    with _mesh(config) as target:
        workload = replace(config.workload, num_adapters=len(target.adapter_names))
        runs, warmup_s = asyncio.run(_run_all(config, workload, target))
    report = build_report(config, workload, started, target, runs, warmup_s)
    json_path, png_path = write_report(report, config.output_dir)
    return ServeBenchResult(report, json_path, png_path)


async def _run_all(
    config: ServeBenchConfig, workload: WorkloadSpec, target: Target
) -> tuple[list[ServeRun], float]:
    adapter_names = target.adapter_names
    async with _stream_to(target) as stub:
        warmup_s = 0.0
        if config.warmup:
            used = sorted({r.adapter for r in plan(workload)} - {None})
            warmup = [PlannedRequest(0.0, index, "warm up", 1) for index in [None, *used]]
            start = time.perf_counter()
            await _run_closed(stub, warmup, adapter_names, config.request_timeout_s)
            warmup_s = time.perf_counter() - start
        runs = []
        for position, rate in enumerate(config.rates):
            # a prompt set per run: no run finds an earlier one's prompts in the shards' prefix caches
            adapters_run = plan(replace(workload, rate=rate, prompt_set=2 * position))
            base_run = base_only(plan(replace(workload, rate=rate, prompt_set=2 * position + 1)))
            systems = [("adapters", adapters_run), ("base", base_run)]
            for system, planned in systems[:: 1 if position % 2 == 0 else -1]:
                results = await run_open_loop(stub, planned, adapter_names, config.request_timeout_s)
                runs.append(ServeRun(system, rate, results))
        return runs, warmup_s


@contextlib.asynccontextmanager
async def _stream_to(target: Target) -> AsyncIterator[Stream]:
    """A Stream through the router, or straight to target.shard with each adapter's record attached."""
    if target.shard is None:
        async with grpc.aio.insecure_channel(target.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            yield lambda request, timeout_s: stub.GenerateStream(request, timeout=timeout_s)
        return
    async with grpc.aio.insecure_channel(target.router) as channel:
        listed = await adapters_pb2_grpc.AdaptersStub(channel).List(
            adapters_pb2.ListAdaptersRequest(), timeout=30
        )
    records = {adapter.name: adapter for adapter in listed.adapters}
    if missing := sorted(set(target.adapter_names) - set(records)):
        raise RuntimeError(f"adapters {missing} are not registered at {target.router}")
    async with grpc.aio.insecure_channel(target.shard) as channel:
        shard = shard_pb2_grpc.ShardStub(channel)

        def stream(request: common_pb2.GenerateRequest, timeout_s: float):
            shard_request = shard_pb2.ShardGenerateRequest(request=request)
            if request.adapter:
                shard_request.adapter.CopyFrom(records[request.adapter])
            return shard.Generate(shard_request, timeout=timeout_s)

        yield stream


async def run_open_loop(
    stub: Stream,
    requests: list[PlannedRequest],
    adapter_names: tuple[str, ...],
    timeout_s: float,
) -> list[RequestResult]:
    """Send each request at its planned time, whether or not earlier ones have finished."""
    start = time.perf_counter()
    tasks = []
    for planned in requests:
        delay = start + planned.at_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        result = RequestResult(planned.at_s)
        result.lag_s = max(0.0, time.perf_counter() - start - planned.at_s)
        tasks.append(asyncio.create_task(_send(stub, planned, adapter_names, timeout_s, result)))
    return list(await asyncio.gather(*tasks))


async def _run_closed(stub: Stream, requests: list[PlannedRequest], adapter_names, timeout_s: float) -> None:
    """requests WARMUP_CONCURRENCY at a time; any failure ends the bench (the mesh is not usable)."""
    for begin in range(0, len(requests), WARMUP_CONCURRENCY):
        batch = requests[begin : begin + WARMUP_CONCURRENCY]
        results = await asyncio.gather(
            *(_send(stub, r, adapter_names, timeout_s, RequestResult(0.0)) for r in batch)
        )
        if failed := [r for r in results if r.error]:
            raise RuntimeError(
                f"warm-up request for {failed[0].expected_adapter or 'the base model'!r} failed with "
                f"{failed[0].error}; is the mesh serving and the adapter valid for its base model?"
            )


async def _send(
    stub: Stream,
    planned: PlannedRequest,
    adapter_names: tuple[str, ...],
    timeout_s: float,
    result: RequestResult,
) -> RequestResult:
    result.expected_adapter = adapter_names[planned.adapter] if planned.adapter is not None else ""
    request = common_pb2.GenerateRequest(
        adapter=result.expected_adapter,
        prompt=planned.prompt,
        parameters=common_pb2.SamplingParameters(max_new_tokens=planned.max_new_tokens, ignore_eos=True),
    )
    result.sent = time.perf_counter()
    try:
        async for chunk in stub(request, timeout_s):
            if result.first_chunk is None and (chunk.text or chunk.tokens):
                result.first_chunk = time.perf_counter()
            if chunk.finish_reason:
                result.prompt_tokens = chunk.usage.prompt_tokens
                result.completion_tokens = chunk.usage.completion_tokens
                result.served_adapter = chunk.served_by.adapter
    except grpc.aio.AioRpcError as error:
        result.error = error.code().name
    result.finished = time.perf_counter()
    return result


# --- the mesh under test ---------------------------------------------------------------------------


@contextlib.contextmanager
def _mesh(config: ServeBenchConfig) -> Iterator[Target]:
    """Where the requests go and the adapters' names, in a running mesh or a private one."""
    if config.router is not None:
        if config.direct and config.shard is None:
            raise ValueError("with a running mesh's router, name the shard to send to directly")
        names = config.adapter_names or _registered_adapters(config.router)
        yield Target(config.router, names, config.shard)
        return
    if config.private_mesh is None:
        raise ValueError("give a running mesh's router or a private mesh to start")
    if config.shard is not None:
        raise ValueError("a shard address needs its mesh's router (for the adapters' records)")
    with _private_mesh(config.private_mesh, config.workload.num_adapters) as (running, names):
        yield Target(running.router, names, next(iter(running.shards.values())) if config.direct else None)


def _registered_adapters(router: str) -> tuple[str, ...]:
    with grpc.insecure_channel(router) as channel:
        listed = adapters_pb2_grpc.AdaptersStub(channel).List(adapters_pb2.ListAdaptersRequest(), timeout=30)
    names = tuple(sorted(adapter.name for adapter in listed.adapters))
    if not names:
        raise RuntimeError(f"the mesh at {router} has no adapters registered; add some or name them")
    return names


@contextlib.contextmanager
def _private_mesh(mesh: PrivateMesh, num_adapters: int) -> Iterator[tuple[Mesh, tuple[str, ...]]]:
    """redis-server (unless given), the shards and a router; num_adapters random adapters registered."""
    with tempfile.TemporaryDirectory(prefix="loraplex-bench-serve-") as workdir:
        processes = []
        running = None
        try:
            redis_url = mesh.redis_url
            if redis_url is None:
                redis, redis_url = start_private_redis(Path(workdir))
                processes.append(redis)
            namespace = f"bench-serve-{uuid.uuid4().hex[:8]}"
            running = start_mesh(
                mesh.model_dir,
                redis_url,
                namespace,
                Path(workdir),
                mesh.num_shards,
                shard_args=mesh.shard_args,
            )
            names = _register_random_adapters(running.router, mesh, num_adapters, Path(workdir, "adapters"))
            yield running, names
        finally:
            if running is not None:
                running.stop()
            stop_all(processes)


def _register_random_adapters(router: str, mesh: PrivateMesh, count: int, directory: Path) -> tuple[str, ...]:
    from loraplex.tools.synthetic_adapters import write_peft_adapter  # torch: only where adapters are made

    names = []
    with grpc.insecure_channel(router) as channel:
        adapters = adapters_pb2_grpc.AdaptersStub(channel)
        for index in range(count):
            name = f"{ADAPTER_PREFIX}{index}"
            source = write_peft_adapter(
                directory / name,
                mesh.model_dir,
                rank=mesh.ranks[index % len(mesh.ranks)],
                targets=mesh.targets,
                seed=index,
            )
            adapters.Create(adapters_pb2.CreateAdapterRequest(name=name, source=str(source)), timeout=60)
            names.append(name)
    return tuple(names)


# --- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, add_model_options) -> None:
    """The bench's flags for `loraplex bench serve`; defaults are ServeBenchConfig's and WorkloadSpec's."""
    add_model_options(parser)
    config, workload = ServeBenchConfig(), WorkloadSpec()
    parser.add_argument("--router", default=None, help="a running mesh's router; default: a private mesh")
    parser.add_argument(
        "--adapter-names",
        default="",
        help="with --router: comma-separated adapters (default: all registered)",
    )
    parser.add_argument(
        "--shard",
        default=None,
        help="with --router: send straight to this shard (ADDRESS), without the router's hop",
    )
    parser.add_argument(
        "--direct", action="store_true", help="private mesh: send straight to its shard, without the router"
    )
    parser.add_argument(
        "--rates",
        default=",".join(str(rate) for rate in config.rates),
        help="offered requests/s, one run each, e.g. 1,2,inf (inf: every request at once)",
    )
    parser.add_argument("--num-requests", type=int, default=workload.num_requests, help="per run")
    parser.add_argument("--arrival", choices=ARRIVALS, default=workload.arrival)
    parser.add_argument("--burstiness", type=float, default=workload.burstiness, help="Gamma shape")
    parser.add_argument("--mix", choices=MIXES, default=workload.mix, help="adapter popularity")
    parser.add_argument("--alpha", type=float, default=workload.alpha, help="the zipf mix's exponent")
    parser.add_argument(
        "--num-adapters", type=int, default=workload.num_adapters, help="adapters a private mesh registers"
    )
    parser.add_argument("--input-len", type=int, default=workload.input_len, help="prompt tokens")
    parser.add_argument("--output-len", type=int, default=workload.output_len, help="tokens generated")
    parser.add_argument(
        "--len-spread", type=float, default=workload.len_spread, help="lengths +- this fraction"
    )
    parser.add_argument("--seed", type=int, default=workload.seed)
    parser.add_argument("--slo-ttft-ms", type=float, default=config.slo_ttft_ms)
    parser.add_argument("--slo-tpot-ms", type=float, default=config.slo_tpot_ms)
    parser.add_argument("--no-warmup", action="store_true", help="measure cold adapter loads as well")
    parser.add_argument("--shards", type=int, default=1, help="private mesh: shard processes")
    parser.add_argument("--redis-url", default=None, help="private mesh: default, a private redis-server")
    parser.add_argument(
        "--shard-arg",
        action="append",
        default=[],
        help="private mesh: a flag for every shard, e.g. --shard-arg=--max-gpu-adapters=16 (repeatable)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    from loraplex.tools.model_store import resolve_model

    workload = WorkloadSpec(
        num_requests=args.num_requests,
        arrival=args.arrival,
        burstiness=args.burstiness,
        mix=args.mix,
        alpha=args.alpha,
        num_adapters=args.num_adapters,
        input_len=args.input_len,
        output_len=args.output_len,
        len_spread=args.len_spread,
        seed=args.seed,
    )
    private = None
    if args.router is None:
        shard_args = (*args.shard_arg, "--device", args.device, "--log-level", args.log_level)
        if args.kv_cache_bytes:
            shard_args += ("--kv-cache-bytes", str(args.kv_cache_bytes))
        private = PrivateMesh(
            resolve_model(args.model, args.cache_dir), args.shards, shard_args, redis_url=args.redis_url
        )
    config = ServeBenchConfig(
        workload=workload,
        rates=tuple(float(rate) for rate in args.rates.split(",")),
        router=args.router,
        private_mesh=private,
        adapter_names=tuple(name for name in args.adapter_names.split(",") if name),
        shard=args.shard,
        direct=args.direct or args.shard is not None,
        slo_ttft_ms=args.slo_ttft_ms,
        slo_tpot_ms=args.slo_tpot_ms,
        warmup=not args.no_warmup,
        output_dir=args.output_dir,
    )
    result = run_serve_bench(config)
    print(summary_table(result.report))
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0
