"""deploy/ against real loraplex servers on loopback: the shard StatefulSet's own command starts a shard
that advertises the pod's address, and deploy/docker/healthcheck.py passes a SERVING shard or router and
fails one that drains (NOT_SERVING) or is gone (unreachable). Real redis-server, tiny model, no mocks."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_deploy import DEPLOY, container, container_env, expand, render, workload

from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.registry.store import Registry
from loraplex.tools.processes import free_port, loraplex_command, spawn, stop_all, wait_serving
from loraplex.tools.tiny_model import write_tiny_model

SCRIPT = DEPLOY / "docker" / "healthcheck.py"
POD_IP = "127.0.0.1"  # what status.podIP is on this machine
POD_NAME = "shard-0"


def load_healthcheck() -> ModuleType:
    """The script as a module, to poll it many times a second while a drain lasts."""
    spec = importlib.util.spec_from_file_location("healthcheck", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_healthcheck(target: str) -> int:
    """The script as Docker's HEALTHCHECK runs it: its exit status."""
    env = {**os.environ, "HEALTHCHECK_TARGET": target}
    return subprocess.run([sys.executable, str(SCRIPT)], env=env, timeout=30, check=False).returncode


def health_status(address: str) -> int | None:
    """The server's ("") status, or None when nothing answers."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.RpcError:
            return None
    return reply.status


@pytest.fixture(scope="module")
def slow_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A tiny random model with room for long generations, so a drain lasts a few seconds."""
    return write_tiny_model(tmp_path_factory.mktemp("tiny-long"), smollm2_dir, max_context=2048)


def manifest_shard_command(slow_model_dir: Path, redis_url: str, namespace: str, tmp_path: Path) -> tuple:
    """The shard container's command from the rendered cpu overlay, $(VAR)s expanded with this
    machine's pod IP and name, and the environment it sees; only what must differ here is overridden
    (a free port, local directories, the test model, Redis and key prefix)."""
    spec = container(workload(render("cpu"), "shard"))
    env = container_env(render("cpu"), spec) | {"POD_IP": POD_IP, "POD_NAME": POD_NAME}
    argv = [expand(argument, env) for argument in [*spec["command"], *spec["args"]]]
    port = free_port()
    env |= {
        "LORAPLEX_MODEL": str(slow_model_dir),
        "LORAPLEX_REDIS_URL": redis_url,
        "LORAPLEX_NAMESPACE": namespace,
        "LORAPLEX_KV_CACHE_BYTES": "64MiB",
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
    }
    overrides = [
        f"--port={port}",
        "--metrics-port=0",
        f"--cache-dir={tmp_path / 'cache'}",
        f"--disk-cache-dir={tmp_path / 'cache' / 'adapters'}",
    ]
    assert argv[:2] == ["loraplex", "shard"]
    return loraplex_command(*argv[1:], *overrides), env, port


@pytest.fixture
def manifest_shard(
    slow_model_dir: Path, redis_url: str, namespace: str, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen, int]]:
    command, env, port = manifest_shard_command(slow_model_dir, redis_url, namespace, tmp_path)
    with open(tmp_path / "shard.log", "ab") as log:
        process = subprocess.Popen(command, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_serving(f"127.0.0.1:{port}", process, timeout_s=120)
        yield process, port
    finally:
        stop_all([process])


def live_addresses(redis_url: str, namespace: str) -> dict[str, str]:
    async def read() -> dict[str, str]:
        registry = Registry(redis_url, namespace)
        try:
            return {record.shard_id: record.address for record in await registry.live_shards()}
        finally:
            await registry.close()

    return asyncio.run(read())


def generate_until_cut(address: str, done: threading.Event) -> None:
    """One long generation straight to the shard; it keeps the shard's drain going."""
    request = shard_pb2.ShardGenerateRequest(
        request=common_pb2.GenerateRequest(
            prompt_token_ids=[1, 2, 3],
            parameters=common_pb2.SamplingParameters(max_new_tokens=1000, ignore_eos=True),
        )
    )
    with grpc.insecure_channel(address) as channel:
        try:
            for _ in shard_pb2_grpc.ShardStub(channel).Generate(request, timeout=60):
                pass
        except grpc.RpcError:
            pass
    done.set()


def test_manifest_shard_advertises_the_pod_address_and_drains_not_serving(
    manifest_shard: tuple[subprocess.Popen, int], redis_url: str, namespace: str
) -> None:
    process, port = manifest_shard
    address = f"127.0.0.1:{port}"
    # routers dial what the shard registers: the pod's IP and the port it serves, not 0.0.0.0
    assert live_addresses(redis_url, namespace) == {POD_NAME: f"{POD_IP}:{port}"}
    assert run_healthcheck(f"grpc://{address}") == 0

    done = threading.Event()
    threading.Thread(target=generate_until_cut, args=(address, done), daemon=True).start()
    time.sleep(0.5)  # the generation is running
    assert not done.is_set(), "the generation must outlast the start of the drain"
    process.send_signal(signal.SIGTERM)
    healthcheck = load_healthcheck()
    deadline = time.monotonic() + 5
    while health_status(address) != health_pb2.HealthCheckResponse.NOT_SERVING:
        assert time.monotonic() < deadline, "a draining shard reports NOT_SERVING on its open port"
        time.sleep(0.05)
    assert not healthcheck.check(f"grpc://{address}"), "NOT_SERVING fails the healthcheck"
    assert live_addresses(redis_url, namespace) == {}, "a draining shard has left the registry"

    assert process.wait(timeout=30) == 0
    assert not healthcheck.check(f"grpc://{address}"), "nothing listening fails the healthcheck"
    assert run_healthcheck(f"grpc://{address}") == 1


def test_healthcheck_passes_a_serving_router_and_fails_one_stopped(
    redis_url: str, namespace: str, tmp_path: Path
) -> None:
    port = free_port()
    router = spawn(
        loraplex_command(
            "router",
            "--host=0.0.0.0",
            f"--port={port}",
            f"--redis-url={redis_url}",
            f"--namespace={namespace}",
        ),
        tmp_path / "router.log",
    )
    try:
        wait_serving(f"127.0.0.1:{port}", router, timeout_s=60)
        assert run_healthcheck(f"grpc://127.0.0.1:{port}") == 0
    finally:
        stop_all([router])
    assert run_healthcheck(f"grpc://127.0.0.1:{port}") == 1


def test_healthcheck_fails_when_nothing_listens() -> None:
    port = free_port()
    assert run_healthcheck(f"grpc://127.0.0.1:{port}") == 1
    assert run_healthcheck(f"http://127.0.0.1:{port}/health") == 1
