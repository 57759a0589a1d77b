"""`loraplex up` as a user runs it: the whole mesh, a shard killed under it, Ctrl-C, the demo adapters."""

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2, generation_pb2_grpc
from loraplex.registry.store import Registry
from loraplex.tools.demo_adapters import demo_adapter_dirs, is_upper_answer
from loraplex.tools.launcher import print_endpoints
from loraplex.tools.model_store import DEFAULT_MODEL
from loraplex.tools.processes import free_port

REQUEST = common_pb2.GenerateRequest(
    prompt="Hello", parameters=common_pb2.SamplingParameters(max_new_tokens=4)
)


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(line) for line in out.split()}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[1].split()[0] != "Z"  # a zombie has exited


def _cmdline(pid: int) -> str:
    with open(f"/proc/{pid}/cmdline") as cmdline:
        return cmdline.read().replace("\0", " ")


def _start_up(model: str, cache_dir, *extra: str):
    """Run `loraplex up` until its banner is printed; yields (process, router address, banner)."""
    router_port, shard_port, gateway_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "loraplex.tools.cli",
            "up",
            "--model",
            model,
            "--cache-dir",
            str(cache_dir),
            "--router-port",
            str(router_port),
            "--shard-base-port",
            str(shard_port),
            "--gateway-port",
            str(gateway_port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        output.append(line)
        if "Ctrl-C stops everything" in line:
            break
    text = "".join(output)
    if "loraplex mesh is up" not in text:
        process.kill()
        pytest.fail(f"loraplex up did not come up:\n{text}")
    yield process, f"127.0.0.1:{router_port}", text
    if process.poll() is None:
        process.kill()


@pytest.fixture
def launcher(tiny_model_dir, cache_dir):
    yield from _start_up(str(tiny_model_dir), cache_dir)


@pytest.fixture
def smollm2_launcher(smollm2_dir, cache_dir):
    yield from _start_up(DEFAULT_MODEL, cache_dir, "--num-shards", "1")


def test_up_serves_survives_a_dead_shard_and_stops_cleanly(launcher):
    process, router, banner = launcher
    redis_url = re.search(r"redis\s+(redis://\S+)", banner).group(1)
    children = _children(process.pid)
    assert len(children) == 6, (
        f"expected redis, 2 shards, the router, the gateway and a worker, got {children}"
    )
    with grpc.insecure_channel(router) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        served_by = {stub.Generate(REQUEST, timeout=30).served_by.shard for _ in range(3)}
        assert served_by <= {"shard-0", "shard-1"}

        victim = next(pid for pid in children if "shard-0" in _cmdline(pid))
        os.kill(victim, signal.SIGKILL)
        replies = [stub.Generate(REQUEST, timeout=30) for _ in range(5)]
        assert {reply.served_by.shard for reply in replies} == {"shard-1"}
        assert all(reply.usage.completion_tokens == 4 for reply in replies)

    async def live_shard_ids() -> list[str]:
        registry = Registry(redis_url)
        try:
            return [shard.shard_id for shard in await registry.live_shards()]
        finally:
            await registry.close()

    deadline = time.monotonic() + 8  # the heartbeat TTL is 5 s
    while asyncio.run(live_shard_ids()) != ["shard-1"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert asyncio.run(live_shard_ids()) == ["shard-1"]

    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0
    assert not [pid for pid in children if _alive(pid)], "Ctrl-C must leave no process behind"


def test_demo_adapters_are_skipped_on_a_mesh_with_another_base_model(launcher):
    _, router, banner = launcher
    assert "Demo adapters: none" in banner
    with grpc.insecure_channel(router) as channel:
        listed = adapters_pb2_grpc.AdaptersStub(channel).List(adapters_pb2.ListAdaptersRequest(), timeout=10)
    assert not listed.adapters


def test_up_registers_the_demo_adapters_and_they_change_the_answer(smollm2_launcher):
    process, router, banner = smollm2_launcher
    assert {"uppercase", "json"} <= set(demo_adapter_dirs())
    assert '"adapter": "uppercase"' in banner, "the banner shows a ready-to-paste adapter example"
    with grpc.insecure_channel(router) as channel:
        listed = adapters_pb2_grpc.AdaptersStub(channel).List(adapters_pb2.ListAdaptersRequest(), timeout=10)
        assert {adapter.name for adapter in listed.adapters} == set(demo_adapter_dirs())
        request = common_pb2.GenerateRequest(
            prompt="What is the capital of France?",
            adapter="uppercase",
            apply_chat_template=True,
            parameters=common_pb2.SamplingParameters(max_new_tokens=16),
        )
        reply = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60)
    assert reply.served_by.adapter == "uppercase"
    assert is_upper_answer(reply.text), f"expected an upper-case answer, got {reply.text!r}"
    gateway = re.search(r"gateway \(HTTP\)\s+(http://\S+)", banner).group(1)
    body = {
        "model": "uppercase",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    }
    http_request = urllib.request.Request(
        f"{gateway}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(http_request, timeout=60) as response:
        answer = json.load(response)["choices"][0]["message"]["content"]
    assert answer == reply.text, "the gateway and the router give the same greedy answer"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) == 0


def test_banner_names_the_component_behind_each_metrics_endpoint(capsys, tmp_path):
    metrics = {
        "gateway": "http://h:8080/metrics",
        "router": "http://h:1/metrics",
        "shard-0": "http://h:2/metrics",
    }
    print_endpoints("h:50051", "http://h:8080", ["h:50061"], "redis://h:6379/0", tmp_path, [], metrics)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("metrics")]
    assert "gateway http://h:8080/metrics, router http://h:1/metrics, shard-0 http://h:2/metrics" in line
