"""`loraplex up`: a private redis-server, N shards, a router, the REST gateway and an async-job worker
on this machine, until Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import grpc

from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.tools.demo_adapters import demo_adapter_dirs
from loraplex.tools.model_store import DEFAULT_MODEL, resolve_model
from loraplex.tools.processes import (
    free_port,
    loraplex_command,
    spawn,
    start_private_redis,
    stop_all,
    wait_http_ok,
    wait_serving,
)


@dataclass(frozen=True)
class MeshConfig:
    model: str
    cache_dir: Path
    namespace: str
    redis_url: str  # empty: start a private redis-server
    num_shards: int
    host: str
    router_port: int
    shard_base_port: int
    gateway_port: int = 8080
    log_level: str = "INFO"


def run_mesh(config: MeshConfig) -> int:
    model_dir = resolve_model(config.model, config.cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-up-"))
    processes: list[subprocess.Popen] = []  # in start order; stopped newest first
    names: dict[int, str] = {}  # pid -> what it is, for messages
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        redis_url = config.redis_url
        if not redis_url:
            redis, redis_url = start_private_redis(workdir)
            processes.append(redis)
            names[redis.pid] = "redis-server"
        common = [
            "--model",
            str(model_dir),
            "--redis-url",
            redis_url,
            "--namespace",
            config.namespace,
            "--cache-dir",
            str(config.cache_dir),
            "--log-level",
            config.log_level,
        ]
        names_with_metrics = ["router", "worker"] + [f"shard-{i}" for i in range(config.num_shards)]
        metrics_ports = {name: free_port() for name in names_with_metrics}
        shards = {}
        for index in range(config.num_shards):
            address = f"{config.host}:{config.shard_base_port + index}"
            command = loraplex_command(
                "shard",
                *common,
                "--shard-id",
                f"shard-{index}",
                "--host",
                config.host,
                "--port",
                str(config.shard_base_port + index),
                "--metrics-port",
                str(metrics_ports[f"shard-{index}"]),
            )
            shards[address] = spawn(command, workdir / f"shard-{index}.log")
            processes.append(shards[address])
            names[shards[address].pid] = f"shard-{index}"
        for address, process in shards.items():
            wait_serving(address, process)
        router_address = f"{config.host}:{config.router_port}"
        router = spawn(
            loraplex_command(
                "router",
                *common,
                "--host",
                config.host,
                "--port",
                str(config.router_port),
                "--metrics-port",
                str(metrics_ports["router"]),
            ),
            workdir / "router.log",
        )
        processes.append(router)
        names[router.pid] = "router"
        wait_serving(router_address, router)
        gateway_url = f"http://{config.host}:{config.gateway_port}"
        gateway = spawn(
            loraplex_command(
                "gateway",
                "--model",
                str(model_dir),
                "--router",
                router_address,
                "--host",
                config.host,
                "--port",
                str(config.gateway_port),
                "--log-level",
                config.log_level,
            ),
            workdir / "gateway.log",
        )
        processes.append(gateway)
        names[gateway.pid] = "gateway"
        worker = spawn(
            loraplex_command(
                "worker",
                "--router",
                router_address,
                "--redis-url",
                redis_url,
                "--namespace",
                config.namespace,
                "--metrics-port",
                str(metrics_ports["worker"]),
                "--log-level",
                config.log_level,
            ),
            workdir / "worker.log",
        )
        processes.append(worker)
        names[worker.pid] = "worker"
        wait_http_ok(f"{gateway_url}/health", gateway)
        demo_names = register_demo_adapters(router_address, demo_adapter_dirs())
        metrics = {"gateway": f"{gateway_url}/metrics"} | {
            name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()
        }
        print_endpoints(router_address, gateway_url, list(shards), redis_url, workdir, demo_names, metrics)
        exited: set[int] = set()
        while not stopping:
            for process in processes:
                if process.poll() is not None and process.pid not in exited:
                    exited.add(process.pid)
                    print(f"warning: {names[process.pid]} exited with code {process.returncode}", flush=True)
            time.sleep(0.5)
        print("\nstopping the mesh ...", flush=True)
        return 0
    finally:
        stop_all(processes[::-1])


def register_demo_adapters(router: str, adapters: dict[str, Path]) -> list[str]:
    """Create the demo adapters in the catalogue; returns the names now registered.

    A name already taken counts as registered (a shared --redis-url keeps the catalogue across runs).
    They are trained for SmolLM2, so a mesh serving another base model refuses them and they are skipped.
    """
    registered = []
    with grpc.insecure_channel(router) as channel:
        stub = adapters_pb2_grpc.AdaptersStub(channel)
        for name, path in adapters.items():
            request = adapters_pb2.CreateAdapterRequest(
                name=name, source=str(path.absolute()), base_model=DEFAULT_MODEL
            )
            try:
                stub.Create(request, timeout=30)
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    continue
                if error.code() != grpc.StatusCode.ALREADY_EXISTS:
                    print(f"warning: demo adapter {name!r} not registered: {error.details()}", flush=True)
                    continue
            registered.append(name)
    return registered


def print_endpoints(
    router: str,
    gateway: str,
    shards: list[str],
    redis_url: str,
    workdir: Path,
    demo_adapters: list[str],
    metrics: dict[str, str],
) -> None:
    """The banner: where everything listens (metrics labelled by component) and requests to paste."""
    if demo_adapters:
        example = "uppercase" if "uppercase" in demo_adapters else demo_adapters[0]
        demo = f"""
Demo adapters: {", ".join(demo_adapters)}
  grpcurl -plaintext -d '{{"prompt": "What is the capital of France?", "adapter": "{example}",
    "apply_chat_template": true, "parameters": {{"max_new_tokens": 32}}}}' {router} loraplex.v1.Generation/Generate
  curl -s {gateway}/v1/chat/completions -H 'Content-Type: application/json' -d '{{"model": "{example}",
    "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32}}'
"""
    else:
        demo = f"\nDemo adapters: none (they are trained for {DEFAULT_MODEL})\n"
    print(
        f"""
loraplex mesh is up
  router (gRPC)  {router}
  gateway (HTTP) {gateway}   OpenAI: {gateway}/v1   TGI: {gateway}/generate
  shards (gRPC)  {", ".join(shards)}
  redis          {redis_url}
  metrics        {", ".join(f"{name} {url}" for name, url in metrics.items())}
  logs           {workdir}

Try it:
  grpcurl -plaintext -d '{{"prompt": "What is the capital of France?", "apply_chat_template": true,
    "parameters": {{"max_new_tokens": 32}}}}' {router} loraplex.v1.Generation/GenerateStream
  curl -s {gateway}/v1/models
{demo}
Ctrl-C stops everything.
""",
        flush=True,
    )
