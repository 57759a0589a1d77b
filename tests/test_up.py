"""`loraplex up` as a user runs it: the whole mesh, a shard killed under it, Ctrl-C, the demo adapters."""

import asyncio
import json
import os
import re
import signal
import socket
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


def _up_args(model, cache_dir, router_port: int | None = None) -> list[str]:
    """`loraplex up`'s arguments for model, every component on a free port unless given."""
    ports = [router_port or free_port(), free_port(), free_port()]
    flags = ["--router-port", "--shard-base-port", "--gateway-port"]
    return ["--model", str(model), "--cache-dir", str(cache_dir)] + [
        part for flag, port in zip(flags, ports, strict=True) for part in (flag, str(port))
    ]


def _up_until_banner_or_exit(*args: str, env: dict | None = None, timeout_s: float = 90):
    """Run `loraplex up` until it exits or prints its banner (then stop it); returns (code, output),
    code None when the mesh came up."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex.tools.cli", "up", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    output, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline and (line := process.stdout.readline()):
        output.append(line)
        if "loraplex mesh is up" in line:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=30)
            return None, "".join(output)
    process.kill()  # its children die with it
    return process.wait(), "".join(output)


def test_up_refuses_a_port_another_mesh_listens_on(tiny_model_dir, cache_dir):
    """gRPC servers bind with SO_REUSEPORT: a router started on a taken port would share it with the
    other process, each answering a random share of the calls, so `up` must refuse the port."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a gRPC server binds
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, output = _up_until_banner_or_exit(*_up_args(tiny_model_dir, cache_dir, router_port=port))
    assert code == 2, f"expected a usage error, got {code}:\n{output}"
    assert f"port {port} (--router-port) on 127.0.0.1 is in use" in output


def test_up_with_a_redis_url_nobody_answers_stops_at_once(tiny_model_dir, cache_dir):
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, output = _up_until_banner_or_exit(*_up_args(tiny_model_dir, cache_dir), "--redis-url", url)
    assert code == 2, f"expected a usage error, got {code}:\n{output}"
    assert f"no Redis answers at --redis-url {url}" in output


def test_up_without_redis_server_on_path_says_what_to_do(tiny_model_dir, cache_dir, tmp_path):
    env = os.environ | {"PATH": str(tmp_path)}  # an empty directory: no redis-server
    code, output = _up_until_banner_or_exit(*_up_args(tiny_model_dir, cache_dir), env=env)
    assert code == 2, output
    assert "redis-server is not on PATH" in output and "--redis-url" in output


def test_a_component_that_fails_to_start_is_named_with_the_end_of_its_log(cache_dir, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "no-such-architecture"}')
    code, output = _up_until_banner_or_exit(*_up_args(model, cache_dir))
    assert code == 1, output
    assert "loraplex up: shard-" in output and "did not start" in output, output
    assert "no-such-architecture" in output, "the end of the shard's log says why"
    assert "Traceback" not in output.split("the end of")[0], "the launcher's own error is no traceback"


@pytest.mark.parametrize("to_process_group", [True, False], ids=["ctrl-c", "sigterm"])
def test_a_signal_while_starting_stops_the_mesh_at_once(tiny_model_dir, cache_dir, to_process_group):
    """Ctrl-C in a terminal reaches the launcher and its children, SIGTERM from a supervisor the
    launcher alone: either stops the start-up there, not once every component is up, leaving nothing."""
    process = subprocess.Popen(
        [sys.executable, "-m", "loraplex.tools.cli", "up", *_up_args(tiny_model_dir, cache_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while len(_children(process.pid)) < 2 and time.monotonic() < deadline:  # redis-server and a shard
        time.sleep(0.05)
    children = _children(process.pid)
    assert len(children) >= 2, "the launcher did not start its children"
    if to_process_group:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=20)
    assert process.returncode == 130, output
    assert "loraplex mesh is up" not in output and "Traceback" not in output, output
    assert "stopping the mesh" in output
    assert not [pid for pid in children if _alive(pid)]


def test_up_refuses_a_port_number_past_65535(tiny_model_dir, cache_dir):
    """gRPC binds 70000 as 70000 - 65536: the banner would name a port nobody serves."""
    code, output = _up_until_banner_or_exit(*_up_args(tiny_model_dir, cache_dir, router_port=70000))
    assert code == 2, f"expected a usage error, got {code}:\n{output}"
    assert "--router-port: '70000' is not a port" in output
    args = _up_args(tiny_model_dir, cache_dir)
    args[args.index("--shard-base-port") + 1] = "65535"  # the second shard would get 65536
    code, output = _up_until_banner_or_exit(*args)
    assert code == 2 and "--shard-base-port 65535 leaves no port for shard 1" in output, output


def test_a_worker_that_dies_at_start_stops_up_with_its_error(tiny_model_dir, cache_dir):
    """The worker is the one child nothing waited on: dead at start (here on a LORAPLEX_* value only it
    reads), `up` printed its banner and ran on with async jobs that never run."""
    env = os.environ | {"LORAPLEX_CLAIM_IDLE": "0"}
    code, output = _up_until_banner_or_exit(
        *_up_args(tiny_model_dir, cache_dir), "--num-shards", "1", env=env
    )
    assert code == 1, f"expected a failed start, got {code}:\n{output}"
    assert "loraplex mesh is up" not in output
    assert "loraplex up: worker did not start" in output and "claim" in output.split("the end of")[1], output
