"""The `loraplex` command. Every flag has a LORAPLEX_* environment equivalent (`env_defaults`, read for
the chosen command only); this module hands each component a frozen config."""

from __future__ import annotations

import os

from loraplex.tools.runtime_env import missing_defaults

os.environ.update(missing_defaults())  # before gRPC and torch load: they read these once

import argparse
import json
import logging
import math
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from loraplex.tools.env_defaults import parse_args
from loraplex.tools.model_store import DEFAULT_MODEL, default_cache_dir, prepare_model

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_ROUTER = "127.0.0.1:50051"
N = TypeVar("N", int, float)


def _add_common(parser: argparse.ArgumentParser, *, files: bool = True, redis: bool = True) -> None:
    """--model and --log-level; --cache-dir for commands that read the model's files, --namespace for
    those that use Redis (the gateway does neither: it names the model and talks to a router)."""
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="embedded model id or a directory with config.json + safetensors",
    )
    if files:
        parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    if redis:
        parser.add_argument("--namespace", default="loraplex", help="Redis key prefix")
    parser.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex", description="One base LLM, many LoRA adapters, one mesh."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole mesh on this machine")
    _add_common(up)
    up.add_argument(
        "--redis-url",
        default="",
        help="use this Redis instead of starting a private redis-server",
    )
    up.add_argument("--num-shards", type=_positive_int, default=2, help="shard processes (default: 2)")
    up.add_argument("--host", default="127.0.0.1", help="address every server binds (default: 127.0.0.1)")
    up.add_argument(
        "--router-port", type=_parse_port, default=50051, help="router gRPC port (default: 50051)"
    )
    up.add_argument(
        "--shard-base-port",
        type=_parse_port,
        default=50061,
        help="the first shard's gRPC port; the next shards take the ports after it (default: 50061)",
    )
    up.add_argument(
        "--gateway-port", type=_parse_port, default=8080, help="REST gateway port (default: 8080)"
    )

    shard = commands.add_parser("shard", help="run one shard server")
    _add_common(shard)
    shard.add_argument("--shard-id", default=socket.gethostname())
    shard.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    shard.add_argument("--host", default="127.0.0.1", help="address to bind")
    shard.add_argument("--port", type=_parse_port, default=50061)
    shard.add_argument("--advertise-host", default="", help="host the router dials (default: --host)")
    shard.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    shard.add_argument(
        "--tp",
        type=_positive_int,
        default=1,
        help="tensor-parallel ranks: one process per rank (on CUDA, GPUs N, N+1, ... from --device cuda:N)",
    )
    shard.add_argument(
        "--tp-timeout",
        type=_positive_seconds,
        default=120.0,
        help="seconds a tensor-parallel rank may keep the others waiting in a step before the shard goes down",
    )
    shard.add_argument(
        "--step-timeout",
        type=_seconds_or_zero,
        default=60.0,
        help="seconds one engine step may run before the shard declares itself stuck, fails its requests "
        "with UNAVAILABLE and exits (0: never; with --tp, at least --tp-timeout + 30)",
    )
    shard.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16", "float16"),
        help="weights and KV cache (auto: float32 on CPU, bfloat16 on GPU)",
    )
    shard.add_argument(
        "--kv-cache-bytes",
        type=parse_bytes,
        default=0,
        help="KV cache budget, e.g. 512MiB or 8GiB (0: 1 GiB on CPU, a share of free memory on GPU)",
    )
    shard.add_argument(
        "--gpu-memory-fraction",
        type=_fraction,
        default=0.9,
        help="share of GPU memory weights plus KV cache may fill when --kv-cache-bytes is 0",
    )
    shard.add_argument("--block-size", type=_positive_int, default=16, help="tokens per KV block")
    shard.add_argument(
        "--max-batch-tokens",
        type=_count,
        default=0,
        help="tokens per engine step, prefill and decode together (0: 512 on CPU, 8192 on GPU)",
    )
    shard.add_argument(
        "--max-running-requests",
        type=_count,
        default=0,
        help="sequences batched at once (0: 64 on CPU, 256 on GPU)",
    )
    shard.add_argument(
        "--no-prefix-caching",
        action="store_true",
        help="recompute every prompt instead of sharing the KV blocks of identical prefixes",
    )
    shard.add_argument("--heartbeat-ttl", type=_positive_seconds, default=5.0)
    _add_metrics_options(shard)
    shard.add_argument(
        "--adapters",
        type=parse_adapter_list,
        default=(),
        help="preload adapters: name=path,... (registered if new); LORA_ADAPTERS is accepted as an alias",
    )
    shard.add_argument(
        "--lora-backend",
        default="auto",
        choices=("auto", "torch", "triton"),
        help="how adapters are applied: Triton SGMV kernels or plain torch (auto: triton on GPU)",
    )
    shard.add_argument(
        "--max-gpu-adapters",
        type=_positive_int,
        default=16,
        help="adapters active in the batch at once (slots); OPTION_MAX_LORAS is accepted as an alias",
    )
    shard.add_argument(
        "--adapter-cycle-s",
        type=_seconds_or_zero,
        default=2.0,
        help="a request that has found every adapter slot busy this long gets the next slot to drain",
    )
    shard.add_argument(
        "--max-cpu-adapters",
        type=_count,
        default=32,
        help="adapters kept loaded in host memory; OPTION_MAX_CPU_LORAS is accepted as an alias",
    )
    shard.add_argument(
        "--disk-cache-dir",
        type=Path,
        default=None,
        help="where adapter files are cached (default: <cache-dir>/adapters/<shard-id>)",
    )
    shard.add_argument(
        "--disk-cache-bytes",
        type=parse_bytes,
        default=parse_bytes("10GiB"),
        help="size cap of the adapter disk cache",
    )
    shard.add_argument("--max-lora-rank", type=_positive_int, default=64)

    router = commands.add_parser("router", help="run one router")
    _add_common(router, files=False)
    router.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=_parse_port, default=50051)
    router.add_argument(
        "--refresh-interval",
        type=_positive_seconds,
        default=1.0,
        help="seconds between re-reads of the registry (catalogue and shard loads)",
    )
    router.add_argument(
        "--capacity-factor",
        type=float,
        default=1.25,
        help="bounded loads: a shard takes a request only while its load stays within this x the mean",
    )
    router.add_argument(
        "--saturation-factor",
        type=_positive_number,
        default=2.0,
        help="RESOURCE_EXHAUSTED once every shard has this x its max running requests outstanding",
    )
    router.add_argument(
        "--shard-keepalive",
        type=_parse_keepalive,
        default=10.0,
        help="seconds of silence from a shard before it is pinged; a shard that does not answer within "
        "half that is treated as gone and its requests retried elsewhere (at least 1)",
    )
    _add_metrics_options(router)

    gateway = commands.add_parser("gateway", help="run the REST gateway (OpenAI and TGI APIs) over a router")
    _add_common(gateway, files=False, redis=False)
    gateway.add_argument("--router", default=DEFAULT_ROUTER, help="router gRPC address")
    gateway.add_argument("--host", default="127.0.0.1")
    gateway.add_argument("--port", type=_parse_port, default=8080)
    gateway.add_argument(
        "--request-timeout",
        type=_positive_seconds,
        default=600.0,
        help="deadline in seconds for one generation through the router",
    )

    worker = commands.add_parser("worker", help="run async jobs from the Redis queue through a router")
    worker.add_argument("--router", default=DEFAULT_ROUTER, help="router gRPC address")
    worker.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    worker.add_argument("--namespace", default="loraplex", help="Redis key prefix")
    worker.add_argument("--log-level", default="INFO")
    worker.add_argument("--concurrency", type=_positive_int, default=8, help="jobs run at once")
    worker.add_argument(
        "--claim-idle",
        type=_positive_seconds,
        default=30.0,
        help="seconds a job may sit unacknowledged before a live worker takes it from a dead one",
    )
    worker.add_argument(
        "--metrics-port",
        type=_metrics_port,
        default=9400,
        help="port of the Prometheus /metrics endpoint (0: off)",
    )
    worker.add_argument(
        "--job-ttl",
        type=_positive_seconds,
        default=86400.0,
        help="seconds a finished job's result or error is kept",
    )
    worker.add_argument(
        "--request-timeout",
        type=_positive_seconds,
        default=600.0,
        help="deadline in seconds for one generation through the router",
    )
    worker.add_argument(
        "--retry-for",
        type=_seconds_or_zero,
        default=600.0,
        help="seconds a job is retried while the mesh answers UNAVAILABLE or RESOURCE_EXHAUSTED before "
        "it fails with that status",
    )
    worker.add_argument("--consumer", default="", help="name in the consumer group (default: hostname-pid)")

    adapters = commands.add_parser("adapters", help="manage the adapter catalogue through a router")
    adapters.add_argument(
        "--router", default=DEFAULT_ROUTER, help=f"router gRPC address (default: {DEFAULT_ROUTER})"
    )
    actions = adapters.add_subparsers(dest="action", required=True)
    # --router after the action too (`adapters ls --router X`); not given there, the one before stands
    router_after = argparse.ArgumentParser(add_help=False)
    router_after.add_argument("--router", default=argparse.SUPPRESS, help="router gRPC address")
    for action, summary in (("add", "register a new adapter"), ("update", "give an adapter a new version")):
        sub = actions.add_parser(action, help=summary, parents=[router_after])
        sub.add_argument("name")
        sub.add_argument("source", help="local path or file:// URI of a PEFT directory or .tar.gz")
    actions.add_parser(
        "rm", help="delete an adapter from the catalogue", parents=[router_after]
    ).add_argument("name")
    actions.add_parser(
        "show", help="one adapter, with the shards holding it and their tiers", parents=[router_after]
    ).add_argument("name")
    actions.add_parser("ls", help="every registered adapter", parents=[router_after])

    model = commands.add_parser("model", help="manage the local model cache")
    model_actions = model.add_subparsers(dest="action", required=True)
    prepare = model_actions.add_parser("prepare", help="convert the embedded model to safetensors")
    prepare.add_argument("--model", default=DEFAULT_MODEL)
    prepare.add_argument("--cache-dir", type=Path, default=default_cache_dir())

    bench = commands.add_parser("bench", help="measure throughput and latency")
    bench_actions = bench.add_subparsers(dest="action", required=True)
    engine = bench_actions.add_parser(
        "engine", help="our engine at several concurrency levels vs transformers generate, JSON + PNG"
    )
    _add_model_bench_options(engine)
    engine.add_argument(
        "--concurrency",
        type=_parse_counts,
        default=(1, 8, 32),
        help="engine requests kept in flight, one level after another, e.g. 1,8,32",
    )
    engine.add_argument(
        "--num-requests",
        type=int,
        default=32,
        help="requests per engine level and for the static-batching baseline",
    )
    engine.add_argument("--max-new-tokens", type=int, default=64)
    engine.add_argument(
        "--baseline-requests",
        type=int,
        default=8,
        help="requests for transformers generate one at a time (slow)",
    )
    engine.add_argument(
        "--max-batch-tokens",
        type=int,
        default=0,
        help="tokens per engine step (0: the engine's default)",
    )
    engine.add_argument(
        "--skip-baselines",
        action="store_true",
        help="run our engine only",
    )
    engine.add_argument(
        "--skip-prefix-cache-comparison",
        action="store_true",
        help="do not rerun the top concurrency level with prefix caching off",
    )
    _add_adapter_bench(bench_actions)
    from loraplex.tools.bench_router import add_arguments as add_router_bench_arguments

    add_router_bench_arguments(
        bench_actions.add_parser(
            "router", help="latency the router adds and routed streams/s, vs calling stand-in shards directly"
        )
    )

    from loraplex.tools.bench_serve import add_arguments as add_serve_bench_arguments

    add_serve_bench_arguments(
        bench_actions.add_parser(
            "serve",
            help="open-loop requests at offered rates through a mesh (running or private), adapters vs "
            "base only: throughput, TTFT, TPOT, SLO attainment; JSON + PNG",
        ),
        _add_model_bench_options,
    )

    from loraplex.tools.bench_tp import add_arguments as add_tp_bench_arguments

    add_tp_bench_arguments(
        bench_actions.add_parser(
            "tp",
            help="tensor-parallel shard vs TP=1: weights and KV per rank, speed, same tokens; JSON + PNG",
        ),
        _add_model_bench_options,
    )

    from loraplex.tools.bench_kernels import add_arguments as add_kernel_bench_arguments

    add_kernel_bench_arguments(
        bench_actions.add_parser(
            "kernels",
            help="Triton multi-LoRA kernels vs the float32 reference (correctness) and a per-adapter torch "
            "loop (speed), per shape, rank, adapter count, batch and dtype; JSON + PNG",
        )
    )

    from loraplex.tools.simulate_placement import add_arguments as add_simulation_arguments

    simulate = commands.add_parser("simulate", help="run production code on simulated clusters")
    simulate_actions = simulate.add_subparsers(dest="action", required=True)
    add_simulation_arguments(
        simulate_actions.add_parser(
            "placement", help="router placement on thousands of simulated shards vs baselines, JSON + PNG"
        )
    )
    return parser


def _add_metrics_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-port",
        type=_metrics_port,
        default=0,
        help="serve Prometheus /metrics on this port (0: off)",
    )
    parser.add_argument(
        "--metrics-adapter-labels",
        type=_count,
        default=32,
        help="adapters that get their own metric label value; later ones share 'other'",
    )


def _add_model_bench_options(parser: argparse.ArgumentParser) -> None:
    """What every benchmark that runs the model takes: which model, where, and where results go."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir())
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--kv-cache-bytes",
        type=parse_bytes,
        default=0,
        help="KV cache budget, e.g. 512MiB (0: the engine's default)",
    )


def _add_adapter_bench(bench_actions) -> None:
    adapters = bench_actions.add_parser(
        "adapters",
        help="1/10/100/1000 adapters with power-law popularity vs base-only and transformers+peft, JSON + PNG",
    )
    _add_model_bench_options(adapters)
    adapters.add_argument(
        "--adapter-counts",
        type=_parse_counts,
        default=(1, 10, 100, 1000),
        help="distinct adapters per level, e.g. 1,10,100,1000",
    )
    adapters.add_argument("--zipf-alpha", type=float, default=1.0)
    adapters.add_argument(
        "--num-requests",
        type=int,
        default=192,
        help="per level, over all rounds",
    )
    adapters.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="base-only and the levels take turns",
    )
    adapters.add_argument("--pairs", type=int, default=3, help="back-to-back base/level batch pairs")
    adapters.add_argument(
        "--prefix-caching",
        action="store_true",
        help="on for every system (off by default: it favours base-only, whose requests all share K/V)",
    )
    adapters.add_argument("--concurrency", type=int, default=32)
    adapters.add_argument("--max-new-tokens", type=int, default=64)
    adapters.add_argument("--ranks", type=_parse_counts, default=(8, 16))
    adapters.add_argument(
        "--targets",
        default="q_proj,k_proj,v_proj,o_proj",
        help="modules every adapter targets, comma-separated",
    )
    adapters.add_argument("--max-gpu-adapters", type=int, default=32)
    adapters.add_argument("--max-cpu-adapters", type=int, default=64)
    adapters.add_argument(
        "--baseline-requests",
        type=int,
        default=8,
        help="requests for transformers + peft one at a time (slow), from the 100-adapter level",
    )
    adapters.add_argument("--skip-baselines", action="store_true", help="no peft run")


def _parse_counts(text: str) -> tuple[int, ...]:
    """'1,8,32' -> (1, 8, 32)."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        counts = ()
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of positive counts; write e.g. 1,8,32")
    return counts


_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'512MiB' -> 536870912; a plain number is bytes."""
    number = text.strip().rstrip("bBiIkKmMgG")
    unit = text.strip()[len(number) :].lower()
    if unit not in _BYTE_UNITS or not number.replace(".", "", 1).isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 1073741824, 512MiB or 8GiB")
    return int(float(number) * _BYTE_UNITS[unit])


def _parse_port(text: str) -> int:
    """A TCP port: gRPC would take 70000 as 70000 % 65536 and the banner would name a port nobody serves."""
    port = int(text) if text.strip().isdigit() else 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port; write a number from 1 to 65535")
    return port


def _checked(convert: Callable[[str], N], fits: Callable[[N], bool], expected: str) -> Callable[[str], N]:
    """An argparse type: convert(text), refused unless it fits, saying what is expected. A negative
    size, a heartbeat TTL of 0 or a port past 65535 would otherwise start a process that cannot work
    (heartbeats Redis refuses, a port gRPC wraps round), or end in a traceback."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not fits(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}")
        return value

    return parse


_positive_int = _checked(int, lambda number: number >= 1, "a whole number >= 1")
_count = _checked(int, lambda number: number >= 0, "a whole number >= 0")
_metrics_port = _checked(int, lambda port: 0 <= port <= 65535, "a port from 1 to 65535, or 0 for none")
_positive_seconds = _checked(float, lambda seconds: 0 < seconds < math.inf, "a number of seconds > 0")
_seconds_or_zero = _checked(float, lambda seconds: 0 <= seconds < math.inf, "a number of seconds >= 0")
_positive_number = _checked(float, lambda number: 0 < number < math.inf, "a number > 0")
_fraction = _checked(float, lambda share: 0 < share <= 1, "a fraction above 0 and at most 1")


def _parse_keepalive(text: str) -> float:
    from loraplex.protos.rpc import MIN_KEEPALIVE_S

    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not seconds >= MIN_KEEPALIVE_S:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= {MIN_KEEPALIVE_S:g}")
    return seconds


def parse_adapter_list(text: str) -> tuple[tuple[str, str], ...]:
    """'a=/path/a,b=file:///b.tar.gz' -> (("a", "/path/a"), ("b", "file:///b.tar.gz"))."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, source = item.partition("=")
        if not sep or not name or not source:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not name=path; write e.g. support=/adapters/support"
            )
        pairs.append((name.strip(), source.strip()))
    return tuple(pairs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"loraplex: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # stdout closed early, as by `loraplex adapters ls | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's flush
        return 1


def _run_up(args: argparse.Namespace) -> int:
    from loraplex.tools.launcher import MeshConfig, run_mesh

    return run_mesh(
        MeshConfig(
            model=args.model,
            cache_dir=args.cache_dir,
            namespace=args.namespace,
            redis_url=args.redis_url,
            num_shards=args.num_shards,
            host=args.host,
            router_port=args.router_port,
            shard_base_port=args.shard_base_port,
            gateway_port=args.gateway_port,
            log_level=args.log_level,
        )
    )


def _run_shard(args: argparse.Namespace) -> int:
    from loraplex.protos.rpc import run_server
    from loraplex.shard.engine import EngineConfig
    from loraplex.shard.server import ShardConfig, ShardFailed, serve

    config = ShardConfig(
        shard_id=args.shard_id,
        model=args.model,
        cache_dir=args.cache_dir,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        engine=EngineConfig(
            device=args.device,
            dtype=args.dtype,
            block_size=args.block_size,
            kv_cache_bytes=args.kv_cache_bytes,
            gpu_memory_fraction=args.gpu_memory_fraction,
            max_batch_tokens=args.max_batch_tokens,
            max_running_requests=args.max_running_requests,
            enable_prefix_caching=not args.no_prefix_caching,
            max_gpu_adapters=args.max_gpu_adapters,
            adapter_cycle_s=args.adapter_cycle_s,
            max_lora_rank=args.max_lora_rank,
            lora_backend=args.lora_backend,
            tp_size=args.tp,
            tp_timeout_s=args.tp_timeout,
            step_timeout_s=args.step_timeout,
        ),
        namespace=args.namespace,
        heartbeat_ttl_s=args.heartbeat_ttl,
        heartbeat_interval_s=args.heartbeat_ttl / 5,
        max_cpu_adapters=args.max_cpu_adapters,
        preload=args.adapters,
        disk_cache_dir=args.disk_cache_dir,
        disk_cache_bytes=args.disk_cache_bytes,
        metrics_port=args.metrics_port,
        metrics_adapter_labels=args.metrics_adapter_labels,
    )
    try:
        run_server(serve(config))
    except ShardFailed as failure:
        print(f"loraplex shard: {failure}", file=sys.stderr)
        return 1
    return 0


def _run_router(args: argparse.Namespace) -> int:
    from loraplex.protos.rpc import run_server
    from loraplex.router.server import RouterConfig, serve

    base_model = Path(args.model).name
    config = RouterConfig(
        redis_url=args.redis_url,
        base_model=base_model,
        host=args.host,
        port=args.port,
        namespace=args.namespace,
        refresh_interval_s=args.refresh_interval,
        capacity_factor=args.capacity_factor,
        saturation_factor=args.saturation_factor,
        shard_keepalive_s=args.shard_keepalive,
        metrics_port=args.metrics_port,
        metrics_adapter_labels=args.metrics_adapter_labels,
    )
    run_server(serve(config))
    return 0


def _run_gateway(args: argparse.Namespace) -> int:
    from loraplex.router.gateway.app import GatewayConfig, serve

    config = GatewayConfig(
        router=args.router,
        model=args.model,
        host=args.host,
        port=args.port,
        request_timeout_s=args.request_timeout,
    )
    serve(config, log_level=args.log_level)
    return 0


def _run_worker(args: argparse.Namespace) -> int:
    from loraplex.protos.rpc import run_server
    from loraplex.router.worker import WorkerConfig, serve

    config = WorkerConfig(
        router=args.router,
        redis_url=args.redis_url,
        consumer=args.consumer or f"{socket.gethostname()}-{os.getpid()}",
        namespace=args.namespace,
        concurrency=args.concurrency,
        claim_idle_s=args.claim_idle,
        metrics_port=args.metrics_port,
        job_ttl_s=args.job_ttl,
        request_timeout_s=args.request_timeout,
        retry_for_s=args.retry_for,
    )
    run_server(serve(config))
    return 0


def _run_adapters(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc

    source = _source_for_router(args.source) if args.action in ("add", "update") else ""
    with grpc.insecure_channel(args.router) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        calls = {
            "add": lambda: stub.Create(adapters_pb2.CreateAdapterRequest(name=args.name, source=source)),
            "update": lambda: stub.Update(adapters_pb2.UpdateAdapterRequest(name=args.name, source=source)),
            "rm": lambda: stub.Delete(adapters_pb2.DeleteAdapterRequest(name=args.name)),
            "show": lambda: stub.Get(adapters_pb2.GetAdapterRequest(name=args.name)),
            "ls": lambda: stub.List(adapters_pb2.ListAdaptersRequest()),
        }
        try:
            reply = calls[args.action]()
        except grpc.RpcError as error:
            print(f"loraplex: {error.code().name}: {error.details()}", file=sys.stderr)
            if error.code() == grpc.StatusCode.UNAVAILABLE and not _connected(channel):
                print(
                    f"no router answers at {args.router}: start the mesh (`loraplex up`), or name a running "
                    "router with `loraplex adapters --router HOST:PORT ...` (or LORAPLEX_ROUTER)",
                    file=sys.stderr,
                )
            return 1
    # the proto's field names, as grpcurl prints them, and empty lists too (`"adapters": []`)
    record = MessageToDict(reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    print(json.dumps(record, indent=2), flush=True)
    return 0


def _connected(channel) -> bool:
    """Whether the channel reached its server: an UNAVAILABLE over a connection is the router's own
    answer (its Redis is away, say); without one, no router is there."""
    import grpc

    try:
        grpc.channel_ready_future(channel).result(timeout=0.5)
    except grpc.FutureTimeoutError:
        return False
    return True


def _source_for_router(source: str) -> str:
    """A relative path that exists here, made absolute: the router and shards resolve sources from
    their own working directories, not the caller's. Anything else (absolute, file://, a path only the
    servers see) goes as typed, and the router refuses a relative one."""
    path = Path(source).expanduser()
    if source and "://" not in source and not path.is_absolute() and path.exists():  # '' is not '.'
        return str(path.resolve())
    return source


def _run_model(args: argparse.Namespace) -> int:
    path = prepare_model(args.model, args.cache_dir)
    print(path)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    if args.action == "adapters":
        return _run_adapter_bench(args)
    if args.action == "router":
        from loraplex.tools.bench_router import run_from_args

        return run_from_args(args)
    if args.action == "serve":
        from loraplex.tools.bench_serve import run_from_args as run_serve_bench

        return run_serve_bench(args)
    if args.action == "tp":
        from loraplex.tools.bench_tp import run_from_args as run_tp_bench

        return run_tp_bench(args)
    if args.action == "kernels":
        from loraplex.tools.bench_kernels import run_from_args as run_kernel_bench

        return run_kernel_bench(args)
    from loraplex.tools.bench_engine import BenchConfig, run_bench
    from loraplex.tools.bench_report import summary_table
    from loraplex.tools.model_store import resolve_model

    config = BenchConfig(
        model_dir=resolve_model(args.model, args.cache_dir),
        device=args.device,
        concurrency=args.concurrency,
        num_requests=args.num_requests,
        max_new_tokens=args.max_new_tokens,
        baseline_requests=args.baseline_requests,
        output_dir=args.output_dir,
        kv_cache_bytes=args.kv_cache_bytes,
        max_batch_tokens=args.max_batch_tokens,
        skip_baselines=args.skip_baselines,
        compare_prefix_caching=not args.skip_prefix_cache_comparison,
    )
    result = run_bench(config)
    print(summary_table(result.report))
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0


def _run_adapter_bench(args: argparse.Namespace) -> int:
    from loraplex.tools.bench_adapters import AdapterBenchConfig, run_adapter_bench
    from loraplex.tools.bench_adapters_report import summary_table
    from loraplex.tools.model_store import resolve_model

    config = AdapterBenchConfig(
        model_dir=resolve_model(args.model, args.cache_dir),
        device=args.device,
        adapter_counts=args.adapter_counts,
        zipf_alpha=args.zipf_alpha,
        num_requests=args.num_requests,
        rounds=args.rounds,
        pairs=args.pairs,
        prefix_caching=args.prefix_caching,
        concurrency=args.concurrency,
        max_new_tokens=args.max_new_tokens,
        ranks=args.ranks,
        targets=tuple(args.targets.split(",")),
        max_gpu_adapters=args.max_gpu_adapters,
        max_cpu_adapters=args.max_cpu_adapters,
        baseline_requests=args.baseline_requests,
        output_dir=args.output_dir,
        kv_cache_bytes=args.kv_cache_bytes,
        skip_baselines=args.skip_baselines,
    )
    result = run_adapter_bench(config)
    print(summary_table(result.report))
    print(f"wrote {result.json_path} and {result.png_path}")
    return 0


def _run_simulate(args: argparse.Namespace) -> int:
    from loraplex.tools.simulate_placement import run_from_args

    return run_from_args(args)


COMMANDS = {
    "up": _run_up,
    "shard": _run_shard,
    "router": _run_router,
    "gateway": _run_gateway,
    "worker": _run_worker,
    "adapters": _run_adapters,
    "model": _run_model,
    "bench": _run_bench,
    "simulate": _run_simulate,
}

if __name__ == "__main__":
    sys.exit(main())
