"""Graceful drain: SIGTERM to a shard under load fails no request, and the router stops sending it new
ones (real redis-server, 2 tiny-model shards, a router)."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest

from loraplex.protos.v1 import common_pb2, generation_pb2_grpc
from loraplex.tools.local_mesh import start_mesh

REQUEST = common_pb2.GenerateRequest(
    prompt="Once upon a time",
    parameters=common_pb2.SamplingParameters(max_new_tokens=48, ignore_eos=True),
)


@pytest.fixture
def mesh(tiny_model_dir, redis_url, namespace, tmp_path):
    mesh = start_mesh(
        tiny_model_dir,
        redis_url,
        namespace,
        tmp_path,
        num_shards=2,
        router_args=("--refresh-interval", "0.25"),
    )
    yield mesh
    mesh.stop()


def test_sigterm_drains_a_shard_under_load_without_failing_a_request(mesh):
    results: list[tuple[float, str, int]] = []  # (start time, served by, completion tokens)
    errors: list[str] = []
    stop_sending = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(mesh.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while not stop_sending.is_set():
                started = time.monotonic()
                try:
                    chunks = list(stub.GenerateStream(REQUEST, timeout=60))
                except grpc.RpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")
                    continue
                last = chunks[-1]
                results.append((started, last.served_by.shard, last.usage.completion_tokens))

    clients = [threading.Thread(target=client) for _ in range(6)]
    for thread in clients:
        thread.start()
    time.sleep(2.0)  # both shards busy
    assert {shard for _, shard, _ in results} == {"shard-0", "shard-1"}
    terminated_at = time.monotonic()
    mesh.processes["shard-0"].send_signal(signal.SIGTERM)
    time.sleep(4.0)
    stop_sending.set()
    for thread in clients:
        thread.join(timeout=60)

    assert mesh.processes["shard-0"].wait(timeout=30) == 0, "a drained shard exits cleanly"
    assert not errors, errors
    assert all(tokens == 48 for _, _, tokens in results), "every stream ran to its end"
    late = [shard for started, shard, _ in results if started > terminated_at + 1.0]
    assert late and set(late) == {"shard-1"}, "new requests go to the shard that stays"
