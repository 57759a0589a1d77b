"""`loraplex up`: a private redis-server, N shards, a router, the REST gateway and an async-job worker
on this machine, until Ctrl-C."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TypeVar

import grpc
import redis

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

T = TypeVar("T")


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


class MeshStartError(Exception):
    """A component did not come up; the message names it and quotes the end of its log."""


def run_mesh(config: MeshConfig) -> int:
    """Start the mesh, print its endpoints and supervise it until SIGINT or SIGTERM. Returns 0 once
    stopped, 1 when a component failed to start, 130 when stopped while starting."""
    check_ports_free(config)
    if config.redis_url:
        check_redis(config.redis_url)
    elif shutil.which("redis-server") is None:
        raise FileNotFoundError(
            "redis-server is not on PATH: install it (apt-get install redis-server, as tools/dev.sh does) "
            "or point --redis-url at a running Redis"
        )
    model_dir = resolve_model(config.model, config.cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="loraplex-up-"))
    processes: list[subprocess.Popen] = []  # in start order; stopped newest first
    names: dict[int, str] = {}  # pid -> what it is, for messages
    stopping = False
    starting = True

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        if starting:  # Ctrl-C while the shards load stops at once, not once everything is up
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        redis_url = config.redis_url
        if not redis_url:
            redis_server, redis_url = _started(
                "redis-server", workdir / "redis.log", partial(start_private_redis, workdir)
            )
            processes.append(redis_server)
            names[redis_server.pid] = "redis-server"
        common = [
            "--model",
            str(model_dir),
            "--redis-url",
            redis_url,
            "--namespace",
            config.namespace,
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
                "--cache-dir",
                str(config.cache_dir),
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
        for index, (address, process) in enumerate(shards.items()):
            _started(
                f"shard-{index}", workdir / f"shard-{index}.log", partial(wait_serving, address, process)
            )
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
        _started("router", workdir / "router.log", partial(wait_serving, router_address, router))
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
        _started("gateway", workdir / "gateway.log", partial(wait_http_ok, f"{gateway_url}/health", gateway))
        # the worker serves its /metrics before it takes jobs: one that dies at start (a LORAPLEX_*
        # value it refuses, say) stops the start here rather than leave a mesh whose jobs never run
        worker_metrics = f"http://127.0.0.1:{metrics_ports['worker']}/metrics"
        _started("worker", workdir / "worker.log", partial(wait_http_ok, worker_metrics, worker))
        demo_names = register_demo_adapters(router_address, demo_adapter_dirs())
        metrics = {"gateway": f"{gateway_url}/metrics"} | {
            name: f"http://127.0.0.1:{port}/metrics" for name, port in metrics_ports.items()
        }
        starting = False
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
    except (KeyboardInterrupt, MeshStartError) as error:  # only while starting
        starting = False  # from here on a signal only asks to stop
        if stopping:  # Ctrl-C in a terminal reaches the children too: they did not fail
            print("\nstopping the mesh ...", flush=True)
            return 130
        print(f"loraplex up: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        stop_all(processes[::-1])


def check_ports_free(config: MeshConfig) -> None:
    """Refuse ports something already listens on, before anything starts. gRPC servers bind with
    SO_REUSEPORT, so a router or shard started on a taken port comes up sharing it with the other
    process, which then answers a random share of its calls (and the health checks waited on here)."""
    flags = [("--router-port", config.router_port), ("--gateway-port", config.gateway_port)]
    flags += [
        ("--shard-base-port" + (f" + {index}" if index else ""), config.shard_base_port + index)
        for index in range(config.num_shards)
    ]
    if config.shard_base_port + config.num_shards - 1 > 65535:
        raise ValueError(
            f"--shard-base-port {config.shard_base_port} leaves no port for shard {config.num_shards - 1}"
        )
    taken: dict[int, str] = {}
    for flag, port in flags:
        if port in taken:
            raise ValueError(f"{taken[port]} and {flag} are both port {port}; give each component its own")
        taken[port] = flag
        if _port_in_use(config.host, port):
            raise ValueError(
                f"port {port} ({flag}) on {config.host} is in use, by another mesh perhaps; "
                f"stop that or choose another port with {flag.split()[0]}"
            )


def _port_in_use(host: str, port: int) -> bool:
    """Whether host:port cannot be bound. SO_REUSEADDR, which the servers set too, keeps connections of
    an earlier run waiting in TIME_WAIT from counting."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise ValueError(f"--host {host!r} does not resolve: {error}") from error
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError:
                return True
    return False


def check_redis(url: str) -> None:
    """Fail now when --redis-url does not answer, rather than come up with every shard, router and
    worker retrying it in their logs."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
    except ValueError as error:
        raise ValueError(f"--redis-url {url!r} is not a Redis URL: {error}") from error
    try:
        client.ping()
    except redis.RedisError as error:
        raise ValueError(
            f"no Redis answers at --redis-url {url}: {error}; start it, or leave --redis-url out for a "
            "private redis-server"
        ) from error
    finally:
        client.close()


def _started(name: str, log: Path, start: Callable[[], T]) -> T:
    """start() one component or wait for it to serve; when it exits or hangs instead, name it and quote
    the end of its log, which says why."""
    try:
        return start()
    except (RuntimeError, TimeoutError) as error:
        raise MeshStartError(f"{name} did not start ({error}); the end of {log}:\n{_tail(log)}") from error


def _tail(log: Path, num_lines: int = 8) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()[-num_lines:]
    except OSError:
        return "  (no log)"
    return "\n".join(f"  {line}" for line in lines)


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
