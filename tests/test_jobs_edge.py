"""Async jobs at their edges: a worker in this process, a real redis-server, and a stand-in router (a real
gRPC Generation server on loopback whose answers each test chooses), so each case runs in seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis

from loraplex.protos.rpc import create_server
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc, jobs_pb2
from loraplex.registry.jobs import JobQueue
from loraplex.router.worker import Worker, WorkerConfig, WorkerMetrics
from loraplex.tools.processes import free_port, loraplex_command, spawn, stop_all

SUCCEEDED = jobs_pb2.JOB_STATE_SUCCEEDED


class StandInRouter(generation_pb2_grpc.GenerationServicer):
    """Answers Generate with the prompt upper-cased after delay_s, keeping each prompt it was sent."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.prompts: list[str] = []

    async def Generate(self, request, context) -> common_pb2.GenerateResponse:
        self.prompts.append(request.prompt)
        await asyncio.sleep(self.delay_s)
        return common_pb2.GenerateResponse(
            text=request.prompt.upper(), finish_reason=common_pb2.FINISH_REASON_LENGTH
        )


@contextlib.asynccontextmanager
async def serving(router: StandInRouter) -> AsyncIterator[generation_pb2_grpc.GenerationStub]:
    server, port, _ = create_server("127.0.0.1:0", [])
    generation_pb2_grpc.add_GenerationServicer_to_server(router, server)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield generation_pb2_grpc.GenerationStub(channel)
    finally:
        await server.stop(None)


@contextlib.asynccontextmanager
async def running(
    config: WorkerConfig, generation: generation_pb2_grpc.GenerationStub
) -> AsyncIterator[None]:
    queue = JobQueue(config.redis_url, config.namespace, ttl_s=config.job_ttl_s)
    stop = asyncio.Event()
    task = asyncio.create_task(Worker(config, queue, generation, WorkerMetrics()).run(stop))
    try:
        yield
    finally:
        stop.set()
        await task
        await queue.close()


def _config(redis_url: str, namespace: str, **fields) -> WorkerConfig:
    return WorkerConfig(
        router="stand-in", redis_url=redis_url, consumer="w", namespace=namespace, metrics_port=0, **fields
    )


def _request(prompt: str) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        prompt=prompt, parameters=common_pb2.SamplingParameters(max_new_tokens=2)
    )


async def _finished(queue: JobQueue, job_id: str, timeout_s: float) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while (job := await queue.get(job_id)) is None or job.state not in (SUCCEEDED, jobs_pb2.JOB_STATE_FAILED):
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {job}"
        await asyncio.sleep(0.05)
    return job


# --- the queue ---------------------------------------------------------------------------------------


def test_an_entry_whose_job_field_is_not_utf8_is_dropped_and_the_jobs_beside_it_still_run(
    redis_url, namespace
):
    """A foreign entry must not make read() raise: the worker would die, and every worker that
    reclaimed the entry after it would die too."""

    async def scenario():
        queue, raw = JobQueue(redis_url, namespace), redis.from_url(redis_url)
        await queue.ensure_group()
        await raw.xadd(queue.stream_key, {"job": b"\xff\xfe"})
        job_id = await queue.submit(_request("ours"))
        (delivery,) = await queue.read("w", count=10, block_ms=100)
        assert delivery.job_id == job_id
        assert (await raw.xlen(queue.stream_key), await queue.backlog()) == (1, 1), "only our job is left"
        await raw.aclose()
        await queue.close()

    asyncio.run(scenario())


# --- the worker --------------------------------------------------------------------------------------


class PersistentRedis:
    """A redis-server with an append-only file on a fixed port: restarted, it still holds the jobs."""

    def __init__(self, workdir: Path) -> None:
        self._workdir, self._port = workdir, free_port()
        self.url = f"redis://127.0.0.1:{self._port}/0"
        self._process = self._start()

    def _start(self) -> subprocess.Popen:
        command = ["redis-server", "--port", str(self._port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "yes", "--appendfsync", "always", "--dir", str(self._workdir)]
        process = spawn(command, self._workdir / "redis.log")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self._port), 0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer")

    def stop(self) -> None:
        stop_all([self._process])

    def start(self) -> None:
        self._process = self._start()


@pytest.fixture
def persistent_redis(tmp_path: Path):
    server = PersistentRedis(tmp_path)
    yield server
    server.stop()


def test_a_result_finished_while_redis_is_away_is_stored_when_it_is_back_not_run_again(persistent_redis):
    """Redis restarts while a job generates: the finished result waits for Redis instead of being
    thrown away, which left the job to be reclaimed after claim_idle_s and generated a second time."""
    router = StandInRouter(delay_s=1.0)

    async def scenario():
        queue, raw = JobQueue(persistent_redis.url, "blip"), redis.from_url(persistent_redis.url)
        config = _config(persistent_redis.url, "blip", claim_idle_s=5, retry_backoff_s=0.1)
        async with serving(router) as generation, running(config, generation):
            job_id = await queue.submit(_request("once"))
            await asyncio.sleep(0.3)
            persistent_redis.stop()  # the job finishes generating while Redis is away
            await asyncio.sleep(1.2)
            persistent_redis.start()
            job = await _finished(queue, job_id, timeout_s=10)
            assert (job.state, job.result.text) == (SUCCEEDED, "ONCE")
            assert router.prompts == ["once"], "the finished generation was run again"
            assert await raw.hget(queue.record_key(job_id), "attempts") == b"1"
            assert await queue.backlog() == 0
        await raw.aclose()
        await queue.close()

    asyncio.run(scenario())


class AwkwardReceiver:
    """An HTTP endpoint recording each request: a POST to /redirect is answered with a 302 to /new, one
    to /stream with a 200 whose body goes on (as a streaming endpoint's would), others with a 204."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.requests.append(("POST", self.path))
                if self.path == "/stream":
                    return self._stream()
                self.send_response(302 if self.path == "/redirect" else 204)
                self.send_header("Location", "/new")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_GET(self) -> None:
                receiver.requests.append(("GET", self.path))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _stream(self) -> None:
                self.send_response(200)
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                ends = time.monotonic() + 8  # so that a worker reading it all fails the test, not hangs it
                with contextlib.suppress(OSError):  # until the worker hangs up
                    while not receiver.closed.is_set() and time.monotonic() < ends:
                        self.wfile.write(b"6\r\ndata:\n\r\n")
                        self.wfile.flush()
                        time.sleep(0.05)

            def log_message(self, *args) -> None:
                pass

        self.closed = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.closed.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    receiver = AwkwardReceiver()
    yield receiver
    receiver.close()


def test_a_callback_answered_with_a_redirect_is_logged_not_resent_as_a_get_without_the_outcome(
    redis_url, namespace, receiver, caplog
):
    """urllib followed a 302 by sending a GET without the outcome, and counted the callback delivered."""

    async def scenario():
        queue = JobQueue(redis_url, namespace)
        config = _config(redis_url, namespace, retry_backoff_s=0.05)
        async with serving(StandInRouter()) as generation, running(config, generation):
            job_id = await queue.submit(_request("hook"), callback_url=f"{receiver.url}/redirect")
            assert (await _finished(queue, job_id, timeout_s=10)).state == SUCCEEDED
            deadline = time.monotonic() + 5
            while "redirects are not followed" not in caplog.text:
                assert time.monotonic() < deadline, f"no failure logged; the receiver saw {receiver.requests}"
                await asyncio.sleep(0.05)
        await queue.close()

    with caplog.at_level(logging.WARNING, logger="loraplex.worker"):
        asyncio.run(scenario())
    assert receiver.requests == [("POST", "/redirect")]
    assert f"use {receiver.url}/new as callback_url" in caplog.text
    assert "(try 1 of 3)" in caplog.text and "(try 2 of 3)" not in caplog.text, "a 3xx is not retried"


def test_a_callback_whose_answer_never_ends_does_not_hold_the_workers_slot(redis_url, namespace, receiver):
    """The worker read the callback's answer to its end: a callback_url naming a streaming endpoint kept
    a job's slot (here the only one) for good, and the jobs behind it waited."""

    async def scenario():
        queue = JobQueue(redis_url, namespace)
        config = _config(redis_url, namespace, concurrency=1, callback_timeout_s=1, drain_timeout_s=1)
        async with serving(StandInRouter()) as generation, running(config, generation):
            streamed = await queue.submit(_request("first"), callback_url=f"{receiver.url}/stream")
            behind = await queue.submit(_request("second"))
            assert (await _finished(queue, streamed, timeout_s=5)).state == SUCCEEDED
            assert (await _finished(queue, behind, timeout_s=5)).result.text == "SECOND"
        await queue.close()

    asyncio.run(scenario())
    assert receiver.requests == [("POST", "/stream")], "a 200 is delivered, however long its body"


@pytest.mark.parametrize(
    ("field", "value"),
    [("claim_idle_s", 0), ("job_ttl_s", 0), ("request_timeout_s", -1), ("concurrency", 0)],
)
def test_worker_settings_that_would_break_the_queue_are_refused(field, value):
    """claim_idle 0 reclaimed live workers' jobs (each job ran several times), job_ttl 0 deleted each
    result as it was stored, concurrency 0 crashed the worker's loop."""
    with pytest.raises(ValueError, match=f"{field} must be"):
        _config("redis://127.0.0.1:1/0", "x", **{field: value})


def test_the_worker_command_refuses_a_zero_claim_idle_with_a_message():
    command = loraplex_command("worker", "--redis-url", "redis://127.0.0.1:1/0", "--claim-idle", "0")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "argument --claim-idle: '0' is not a number of seconds > 0" in done.stderr


class OverloadedRouter(StandInRouter):
    """Answers RESOURCE_EXHAUSTED, as a router whose shards are all saturated does, until busy_until."""

    def __init__(self, busy_for_s: float) -> None:
        super().__init__()
        self.busy_until = time.monotonic() + busy_for_s

    async def Generate(self, request, context) -> common_pb2.GenerateResponse:
        if time.monotonic() < self.busy_until:
            self.prompts.append(request.prompt)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "every shard is saturated")
        return await super().Generate(request, context)


@pytest.mark.parametrize(("busy_for_s", "retry_for_s", "state"), [(2.0, 600.0, SUCCEEDED), (60.0, 0.5, None)])
def test_a_job_waits_out_an_overloaded_mesh_for_retry_for_then_fails_with_its_status(
    redis_url, namespace, busy_for_s, retry_for_s, state
):
    """A burst that saturates every shard is what a queue absorbs: the job is retried (it failed after
    about 7 s of retries before, for a burst of any length) until retry_for_s, then fails saying so."""

    async def scenario() -> jobs_pb2.Job:
        router = OverloadedRouter(busy_for_s)
        config = _config(redis_url, namespace, retry_backoff_s=0.05, retry_for_s=retry_for_s)
        queue = JobQueue(redis_url, namespace)
        async with serving(router) as generation, running(config, generation):
            job = await _finished(queue, await queue.submit(_request("burst")), timeout_s=15)
        await queue.close()
        assert len(router.prompts) > 3, "retried"
        return job

    job = asyncio.run(scenario())
    if state == SUCCEEDED:
        assert (job.state, job.result.text) == (SUCCEEDED, "BURST")
    else:
        assert (job.state, job.error.code) == (jobs_pb2.JOB_STATE_FAILED, "RESOURCE_EXHAUSTED")
        assert job.error.message == "every shard is saturated (still so after retrying for 0.5 s)"
