"""The `loraplex` command. Every flag has a LORAPLEX_* environment equivalent; this module is the only
place that reads the environment, and it hands each component a frozen config."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from pathlib import Path

from loraplex.tools.model_store import DEFAULT_MODEL, default_cache_dir, prepare_model

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_ROUTER = "127.0.0.1:50051"


def _env(name: str, default: str) -> str:
    return os.environ.get(f"LORAPLEX_{name}", default)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=_env("MODEL", DEFAULT_MODEL),
        help="embedded model id or a directory with config.json + safetensors",
    )
    parser.add_argument("--cache-dir", type=Path, default=Path(_env("CACHE_DIR", str(default_cache_dir()))))
    parser.add_argument("--namespace", default=_env("NAMESPACE", "loraplex"), help="Redis key prefix")
    parser.add_argument("--log-level", default=_env("LOG_LEVEL", "INFO"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex", description="One base LLM, many LoRA adapters, one mesh."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    up = commands.add_parser("up", help="run the whole mesh on this machine")
    _add_common(up)
    up.add_argument(
        "--redis-url",
        default=_env("REDIS_URL", ""),
        help="use this Redis instead of starting a private redis-server",
    )
    up.add_argument("--num-shards", type=int, default=int(_env("NUM_SHARDS", "2")))
    up.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    up.add_argument("--router-port", type=int, default=int(_env("ROUTER_PORT", "50051")))
    up.add_argument("--shard-base-port", type=int, default=int(_env("SHARD_BASE_PORT", "50061")))

    shard = commands.add_parser("shard", help="run one shard server")
    _add_common(shard)
    shard.add_argument("--shard-id", default=_env("SHARD_ID", socket.gethostname()))
    shard.add_argument("--redis-url", default=_env("REDIS_URL", DEFAULT_REDIS_URL))
    shard.add_argument("--host", default=_env("HOST", "127.0.0.1"), help="address to bind")
    shard.add_argument("--port", type=int, default=int(_env("PORT", "50061")))
    shard.add_argument(
        "--advertise-host", default=_env("ADVERTISE_HOST", ""), help="host the router dials (default: --host)"
    )
    shard.add_argument("--device", default=_env("DEVICE", "cpu"))
    shard.add_argument("--heartbeat-ttl", type=float, default=float(_env("HEARTBEAT_TTL", "5")))
    shard.add_argument("--max-cpu-adapters", type=int, default=int(_env("MAX_CPU_ADAPTERS", "32")))
    shard.add_argument("--max-lora-rank", type=int, default=int(_env("MAX_LORA_RANK", "64")))

    router = commands.add_parser("router", help="run one router")
    _add_common(router)
    router.add_argument("--redis-url", default=_env("REDIS_URL", DEFAULT_REDIS_URL))
    router.add_argument("--host", default=_env("HOST", "127.0.0.1"))
    router.add_argument("--port", type=int, default=int(_env("PORT", "50051")))

    adapters = commands.add_parser("adapters", help="manage the adapter catalogue through a router")
    adapters.add_argument("--router", default=_env("ROUTER", DEFAULT_ROUTER))
    actions = adapters.add_subparsers(dest="action", required=True)
    for action in ("add", "update"):
        sub = actions.add_parser(action)
        sub.add_argument("name")
        sub.add_argument("source", help="local path or file:// URI of a PEFT directory or .tar.gz")
    actions.add_parser("rm").add_argument("name")
    actions.add_parser("show").add_argument("name")
    actions.add_parser("ls")

    model = commands.add_parser("model", help="manage the local model cache")
    model_actions = model.add_subparsers(dest="action", required=True)
    prepare = model_actions.add_parser("prepare", help="convert the embedded model to safetensors")
    prepare.add_argument("--model", default=_env("MODEL", DEFAULT_MODEL))
    prepare.add_argument("--cache-dir", type=Path, default=Path(_env("CACHE_DIR", str(default_cache_dir()))))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "INFO"), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    try:
        return COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as error:
        print(f"loraplex: {error}", file=sys.stderr)
        return 2


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
            log_level=args.log_level,
        )
    )


def _run_shard(args: argparse.Namespace) -> int:
    from loraplex.shard.server import ShardConfig, serve

    config = ShardConfig(
        shard_id=args.shard_id,
        model=args.model,
        cache_dir=args.cache_dir,
        redis_url=args.redis_url,
        host=args.host,
        port=args.port,
        advertise_host=args.advertise_host,
        device=args.device,
        namespace=args.namespace,
        heartbeat_ttl_s=args.heartbeat_ttl,
        heartbeat_interval_s=args.heartbeat_ttl / 5,
        max_cpu_adapters=args.max_cpu_adapters,
        max_lora_rank=args.max_lora_rank,
    )
    asyncio.run(serve(config))
    return 0


def _run_router(args: argparse.Namespace) -> int:
    from loraplex.router.server import RouterConfig, serve

    base_model = Path(args.model).name
    config = RouterConfig(
        redis_url=args.redis_url,
        base_model=base_model,
        host=args.host,
        port=args.port,
        namespace=args.namespace,
    )
    asyncio.run(serve(config))
    return 0


def _run_adapters(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToDict

    from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc

    with grpc.insecure_channel(args.router) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        calls = {
            "add": lambda: stub.Create(adapters_pb2.CreateAdapterRequest(name=args.name, source=args.source)),
            "update": lambda: stub.Update(
                adapters_pb2.UpdateAdapterRequest(name=args.name, source=args.source)
            ),
            "rm": lambda: stub.Delete(adapters_pb2.DeleteAdapterRequest(name=args.name)),
            "show": lambda: stub.Get(adapters_pb2.GetAdapterRequest(name=args.name)),
            "ls": lambda: stub.List(adapters_pb2.ListAdaptersRequest()),
        }
        try:
            reply = calls[args.action]()
        except grpc.RpcError as error:
            print(f"loraplex: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json.dumps(MessageToDict(reply), indent=2))
    return 0


def _run_model(args: argparse.Namespace) -> int:
    path = prepare_model(args.model, args.cache_dir)
    print(path)
    return 0


COMMANDS = {
    "up": _run_up,
    "shard": _run_shard,
    "router": _run_router,
    "adapters": _run_adapters,
    "model": _run_model,
}

if __name__ == "__main__":
    sys.exit(main())
