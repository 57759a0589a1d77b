"""Async jobs: the queue against a real redis-server, then submit -> worker -> result through a real mesh
(redis-server, a shard on the tiny model, a router, worker processes), a worker SIGKILLed mid-way."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import pytest
import redis.asyncio as redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from loraplex.registry.jobs import GROUP, JobQueue
from loraplex.router.gateway.jobs_api import job_to_dict
from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.processes import (
    free_port,
    loraplex_command,
    spawn,
    stop_all,
    wait_http_ok,
)

from peft_fixtures import write_peft_adapter

NAMESPACE = "jobs-test"
SUCCEEDED, FAILED = jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED


def run(coroutine):
    return asyncio.run(coroutine)


def _request(prompt: str = "hello", max_new_tokens: int = 4) -> common_pb2.GenerateRequest:
    return common_pb2.GenerateRequest(
        prompt=prompt,
        parameters=common_pb2.SamplingParameters(max_new_tokens=max_new_tokens, ignore_eos=True),
    )


def _response(text: str) -> common_pb2.GenerateResponse:
    return common_pb2.GenerateResponse(text=text, finish_reason=common_pb2.FINISH_REASON_LENGTH)


# --- the queue ---------------------------------------------------------------------------------------


def test_a_submitted_job_is_queued_with_a_generous_ttl_that_shrinks_when_it_finishes(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace, ttl_s=60, queued_ttl_s=3600)
        job_id = await queue.submit(_request(), callback_url="http://example.com/hook")
        job = await queue.get(job_id)
        assert (job.job_id, job.state) == (job_id, jobs_pb2.JOB_STATE_QUEUED)
        assert abs(job.created_at.ToNanoseconds() / 1e9 - time.time()) < 5
        assert not job.HasField("finished_at") and not job.HasField("result")
        raw = redis.from_url(redis_url)
        assert 3500_000 < await raw.pttl(queue.record_key(job_id)) <= 3600_000

        (delivery,) = await queue.read("a", count=10, block_ms=100)
        assert (delivery.job_id, delivery.request, delivery.attempts) == (job_id, _request(), 1)
        assert (await queue.get(job_id)).state == jobs_pb2.JOB_STATE_RUNNING
        assert await queue.complete(job_id, delivery.entry_id, _response("done"))
        job = await queue.get(job_id)
        assert (job.state, job.result.text, job.HasField("error")) == (SUCCEEDED, "done", False)
        assert job.finished_at.ToNanoseconds() >= job.created_at.ToNanoseconds()
        assert 0 < await raw.pttl(queue.record_key(job_id)) <= 60_000
        await raw.aclose()
        await queue.close()

    run(scenario())


def test_an_unknown_job_id_is_none(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        assert await queue.get("no-such-job") is None
        assert await queue.backlog() == 0
        await queue.close()

    run(scenario())


def test_a_failed_job_keeps_its_status_name_and_message(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        job_id = await queue.submit(_request())
        (delivery,) = await queue.read("a", count=1, block_ms=100)
        assert await queue.fail(job_id, delivery.entry_id, "NOT_FOUND", "adapter 'x' is not registered")
        job = await queue.get(job_id)
        assert (job.state, job.error.code, job.error.message) == (
            FAILED,
            "NOT_FOUND",
            "adapter 'x' is not registered",
        )
        assert not job.HasField("result") and await queue.backlog() == 0
        await queue.close()

    run(scenario())


def test_each_delivery_carries_the_trace_context_its_job_was_submitted_with(redis_url, namespace):
    traceparent = ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")

    async def scenario():
        queue = JobQueue(redis_url, namespace)
        traced = await queue.submit(_request(), trace_context=(traceparent,))
        untraced = await queue.submit(_request())  # as every record from before trace contexts were kept
        garbled = await queue.submit(_request())
        raw = redis.from_url(redis_url)
        await raw.hset(queue.record_key(garbled), "trace_context", "not json")
        deliveries = await queue.read("a", count=10, block_ms=100)
        assert [(d.job_id, d.trace_context) for d in deliveries] == [
            (traced, (traceparent,)),
            (untraced, ()),
            (garbled, ()),
        ]
        (again,) = await queue.reclaim("b", min_idle_ms=0, count=1)  # a second run links to it too
        assert (again.job_id, again.trace_context) == (traced, (traceparent,))
        await raw.aclose()
        await queue.close()

    run(scenario())


def test_a_job_run_twice_after_a_reclaim_completes_exactly_once(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        job_id = await queue.submit(_request())
        (first,) = await queue.read("slow", count=1, block_ms=100)
        await asyncio.sleep(0.05)
        (second,) = await queue.reclaim("rescuer", min_idle_ms=10, count=5)
        assert (second.job_id, second.entry_id, second.attempts) == (job_id, first.entry_id, 2)

        assert await queue.complete(job_id, second.entry_id, _response("rescuer's"))
        assert not await queue.complete(job_id, first.entry_id, _response("slow's"))
        assert not await queue.fail(job_id, first.entry_id, "UNAVAILABLE", "late")
        job = await queue.get(job_id)
        assert (job.state, job.result.text, job.HasField("error")) == (SUCCEEDED, "rescuer's", False)
        assert await queue.backlog() == 0
        assert await queue.reclaim("rescuer", min_idle_ms=0, count=5) == []
        await queue.close()

    run(scenario())


def test_reclaim_takes_only_idle_entries_and_acks_those_with_nothing_left_to_run(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        raw = redis.from_url(redis_url)
        ids = [await queue.submit(_request(f"job {i}")) for i in range(4)]
        deliveries = await queue.read("dead", count=4, block_ms=100)
        assert [d.job_id for d in deliveries] == ids
        assert await queue.reclaim("live", min_idle_ms=60_000, count=10) == [], "nothing is idle yet"

        await raw.delete(queue.record_key(ids[0]))  # expired while pending
        await raw.xdel(queue.stream_key, deliveries[1].entry_id)  # entry deleted while pending
        await asyncio.sleep(0.05)
        reclaimed = await queue.reclaim("live", min_idle_ms=10, count=10)
        assert [d.job_id for d in reclaimed] == ids[2:]
        assert (await raw.xpending(queue.stream_key, GROUP))["pending"] == 2, (
            "only the live jobs stay pending"
        )
        assert await queue.backlog() == 2
        await raw.aclose()
        await queue.close()

    run(scenario())


def test_entries_that_name_no_job_of_ours_are_dropped_without_stopping_the_reader(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        raw = redis.from_url(redis_url)
        await queue.ensure_group()
        await raw.set(queue.record_key("a-string"), "not a job")
        await raw.hset(queue.record_key("no-request"), mapping={"state": "queued"})
        for fields in ({"other": "x"}, {"job": "no-record"}, {"job": "a-string"}, {"job": "no-request"}):
            await raw.xadd(queue.stream_key, fields)
        job_id = await queue.submit(_request())
        (delivery,) = await queue.read("a", count=10, block_ms=100)
        assert delivery.job_id == job_id
        assert (await raw.xlen(queue.stream_key), await queue.backlog()) == (1, 1), "only our job is left"
        assert await raw.get(queue.record_key("a-string")) == b"not a job", "someone else's key is untouched"
        await raw.aclose()
        await queue.close()

    run(scenario())


def test_a_live_worker_keeps_its_running_entries_from_being_reclaimed(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        await queue.submit(_request())
        (delivery,) = await queue.read("busy", count=1, block_ms=100)
        await asyncio.sleep(0.1)
        assert await queue.touch("someone-else", [delivery.entry_id]) == 0, "touch never takes an entry"
        assert await queue.touch("busy", [delivery.entry_id]) == 1
        assert await queue.reclaim("other", min_idle_ms=80, count=1) == []
        await queue.close()

    run(scenario())


def test_backlog_counts_jobs_not_yet_delivered_and_delivered_but_unfinished(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        ids = [await queue.submit(_request(f"job {i}")) for i in range(5)]
        assert await queue.backlog() == 5, "before any worker made the group"
        first, second = await queue.read("w", count=2, block_ms=100)  # submitted before the group: delivered
        assert await queue.backlog() == 5
        await queue.complete(ids[0], first.entry_id, _response("a"))
        assert await queue.backlog() == 4
        await queue.fail(ids[1], second.entry_id, "INTERNAL", "b")
        assert await queue.backlog() == 3
        for delivery in await queue.read("w", count=10, block_ms=100):
            await queue.complete(delivery.job_id, delivery.entry_id, _response("c"))
        assert await queue.backlog() == 0
        await queue.close()

    run(scenario())


def test_consumers_that_own_no_pending_entry_are_pruned_once_idle(redis_url, namespace):
    async def scenario():
        queue = JobQueue(redis_url, namespace)
        raw = redis.from_url(redis_url)
        assert await queue.prune_consumers(0) == 0, "no stream yet"
        finished, held = [await queue.submit(_request(f"job {i}")) for i in range(2)]
        (done,) = await queue.read("finished-its-job", count=1, block_ms=100)
        await queue.complete(finished, done.entry_id, _response("a"))
        (holding,) = await queue.read("holding-a-job", count=1, block_ms=100)
        await asyncio.sleep(0.05)
        assert await queue.prune_consumers(60_000) == 0, "nobody is idle that long"
        assert await queue.prune_consumers(0, "holding-a-job") == 0, "its job would be lost"
        assert await queue.prune_consumers(10) == 1
        names = [c["name"] for c in await raw.xinfo_consumers(queue.stream_key, GROUP)]
        assert names == [b"holding-a-job"]
        (again,) = await queue.reclaim("rescuer", min_idle_ms=10, count=1)
        assert (again.job_id, again.entry_id) == (held, holding.entry_id)
        await raw.aclose()
        await queue.close()

    run(scenario())


def test_a_submit_sent_twice_queues_its_job_once(redis_url, namespace):
    """The client retries a command once on a fresh connection; a submit whose reply was lost runs its
    script again with the same job id, which must not add a second stream entry."""

    async def scenario():
        queue = JobQueue(redis_url, namespace)
        job_id = await queue.submit(_request())
        keys, args = [queue.record_key(job_id), queue.stream_key], [job_id, 60_000, "state", "queued"]
        assert await queue._submit(keys=keys, args=args) is None  # the script as a retry would run it
        deliveries = await queue.read("w", count=10, block_ms=100)
        assert [delivery.job_id for delivery in deliveries] == [job_id]
        assert await queue.backlog() == 1
        await queue.close()

    run(scenario())


def test_the_queue_answers_at_once_after_redis_restarts(restartable_redis):
    """Each pooled connection dies with the server; the first call on it must not fail for that."""

    async def scenario():
        queue = JobQueue(restartable_redis.url, "restart")
        job_id = await queue.submit(_request())
        restartable_redis.restart()
        assert await queue.get(job_id) is None, "the non-persistent server forgot the job"
        assert await queue.get(await queue.submit(_request())) is not None
        await queue.close()

    run(scenario())


# --- through the mesh ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, redis_url, tmp_path_factory):
    mesh = start_mesh(
        tiny_model_dir,
        redis_url,
        NAMESPACE,
        tmp_path_factory.mktemp("jobs-logs"),
        num_shards=1,
        shard_args=("--kv-cache-bytes", "64MiB"),
    )
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def channel(mesh):
    with grpc.insecure_channel(mesh.router) as channel:
        yield channel


@pytest.fixture
def jobs(channel):
    return jobs_pb2_grpc.JobsStub(channel)


class Workers:
    """Worker processes started by one test, stopped at its end."""

    def __init__(self, mesh, redis_url: str, logdir: Path) -> None:
        self._mesh, self._redis_url, self._logdir = mesh, redis_url, logdir
        self.processes: list[subprocess.Popen] = []

    def start(self, name: str, claim_idle_s: float = 2) -> tuple[subprocess.Popen, int]:
        metrics_port = free_port()
        command = loraplex_command(
            "worker",
            *("--router", self._mesh.router, "--redis-url", self._redis_url, "--namespace", NAMESPACE),
            *("--concurrency", "8", "--claim-idle", str(claim_idle_s), "--metrics-port", str(metrics_port)),
            *("--consumer", name),
        )
        process = spawn(command, self._logdir / f"{name}.log")
        self.processes.append(process)
        assert _wait_until(lambda: _metrics(metrics_port) is not None, 30), f"{name} never served /metrics"
        return process, metrics_port


@pytest.fixture
def workers(mesh, redis_url, tmp_path):
    workers = Workers(mesh, redis_url, tmp_path)
    yield workers
    stop_all(workers.processes)


def _metrics(port: int) -> dict[str, float] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as reply:
            text = reply.read().decode()
    except OSError:
        return None
    samples = (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    return {name: float(value) for name, value in samples}


def _wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _backlog(redis_url: str) -> int:
    async def read():
        queue = JobQueue(redis_url, NAMESPACE)
        try:
            return await queue.backlog()
        finally:
            await queue.close()

    return run(read())


def _wait_for_jobs(jobs, job_ids: list[str], timeout_s: float = 60) -> list[jobs_pb2.Job]:
    finished = (SUCCEEDED, FAILED)
    assert _wait_until(
        lambda: all(
            jobs.Get(jobs_pb2.GetJobRequest(job_id=i), timeout=10).state in finished for i in job_ids
        ),
        timeout_s,
    ), "jobs did not finish in time"
    return [jobs.Get(jobs_pb2.GetJobRequest(job_id=i), timeout=10) for i in job_ids]


def _submit(jobs, request: common_pb2.GenerateRequest, callback_url: str = "") -> str:
    return jobs.Submit(
        jobs_pb2.SubmitJobRequest(request=request, callback_url=callback_url), timeout=10
    ).job_id


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details()


def test_the_router_serves_jobs_and_checks_a_submission_at_once(channel, jobs, redis_url):
    queued = _backlog(redis_url)
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="loraplex.v1.Jobs"), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    no_input = jobs_pb2.SubmitJobRequest(request=common_pb2.GenerateRequest())
    assert _code(lambda: jobs.Submit(no_input, timeout=5)) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "set exactly one of `prompt` (non-empty text), `messages` or `prompt_token_ids`",
    )
    templated_chat = common_pb2.GenerateRequest(
        messages=[common_pb2.ChatMessage(role="user", content="hi")], apply_chat_template=True
    )
    code, message = _code(lambda: jobs.Submit(jobs_pb2.SubmitJobRequest(request=templated_chat), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "leave apply_chat_template unset" in message
    wizard = common_pb2.GenerateRequest(messages=[common_pb2.ChatMessage(role="wizard", content="hi")])
    code, message = _code(lambda: jobs.Submit(jobs_pb2.SubmitJobRequest(request=wizard), timeout=5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "messages[0].role must be one of" in message
    unknown = jobs_pb2.SubmitJobRequest(request=common_pb2.GenerateRequest(prompt="hi", adapter="ghost"))
    code, message = _code(lambda: jobs.Submit(unknown, timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "'ghost' is not registered" in message
    too_wide = _request()
    too_wide.parameters.top_p = 2
    code, message = _code(lambda: jobs.Submit(jobs_pb2.SubmitJobRequest(request=too_wide), timeout=5))
    assert (code, message) == (grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in (0, 1], got 2.0")
    assert _backlog(redis_url) == queued, "a refused job was queued"
    code, message = _code(lambda: jobs.Get(jobs_pb2.GetJobRequest(job_id="0123abc"), timeout=5))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown or expired" in message


def test_a_callback_url_the_worker_could_never_post_to_is_refused_and_nothing_queued(jobs, redis_url):
    """Each of these was queued, ran, and then failed its callback three times over (urllib refuses
    spaces and non-ASCII in a request line, a port that is no number, and sends no user:password@)."""
    queued = _backlog(redis_url)
    unusable = {
        "ftp://x": "is not an http(s) URL",
        "http:///hook": "is not an http(s) URL",
        "http://127.0.0.1:port/hook": "Port could not be cast to integer",
        "http://127.0.0.1:8080/my hook": "percent-encode",
        "http://127.0.0.1:8080/réponse": "percent-encode",
        "http://user:secret@127.0.0.1:8080/hook": "user:password@ is not sent",
    }
    for url, reason in unusable.items():
        submit = jobs_pb2.SubmitJobRequest(request=_request(), callback_url=url)
        code, message = _code(lambda submit=submit: jobs.Submit(submit, timeout=5))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (url, message)
        assert message.startswith(f"callback_url {url!r}") and reason in message, message
    assert _backlog(redis_url) == queued, "a refused job was queued"


def test_every_job_succeeds_exactly_once_although_a_worker_is_killed_half_way(
    channel, jobs, workers, redis_url
):
    requests = [_request(f"Job {i}: write a short line about the sea.") for i in range(200)]
    job_ids = [_submit(jobs, request) for request in requests]
    assert len(set(job_ids)) == 200
    assert _backlog(redis_url) == 200

    first, _ = workers.start("worker-1")
    assert _wait_until(lambda: _backlog(redis_url) <= 100, 60), "the first worker made no progress"
    first.send_signal(signal.SIGKILL)
    first.wait()
    at_kill = {job.job_id: job for job in (jobs.Get(jobs_pb2.GetJobRequest(job_id=i)) for i in job_ids)}
    done_at_kill = {i: job for i, job in at_kill.items() if job.state == SUCCEEDED}
    orphaned = [i for i, job in at_kill.items() if job.state == jobs_pb2.JOB_STATE_RUNNING]
    assert 0 < len(done_at_kill) < 200 and orphaned, "the kill should land with jobs done and in flight"

    _, metrics_port = workers.start("worker-2")
    finished = _wait_for_jobs(jobs, job_ids)
    assert [job.state for job in finished] == [SUCCEEDED] * 200, [job.error for job in finished]
    assert all(job.result.usage.completion_tokens == 4 and not job.HasField("error") for job in finished)
    for job in finished:
        if job.job_id in done_at_kill:  # a stored result is never replaced
            assert job == done_at_kill[job.job_id]

    attempts = run(_attempts(redis_url, orphaned))
    assert attempts == [2] * len(orphaned), "each orphaned job ran once more, on the second worker"
    assert _wait_until(lambda: _metrics(metrics_port)["loraplex_jobs_backlog"] == 0, 10)
    assert _backlog(redis_url) == 0
    metrics = _metrics(metrics_port)
    assert metrics["loraplex_jobs_completed_total"] == 200 - len(done_at_kill), "one stored result per job"
    assert metrics["loraplex_jobs_failed_total"] == 0

    generation = generation_pb2_grpc.GenerationStub(channel)
    for index in (0, 57, 199):
        direct = generation.Generate(requests[index], timeout=30)
        assert (finished[index].result.text, finished[index].result.usage) == (direct.text, direct.usage)


async def _attempts(redis_url: str, job_ids: list[str]) -> list[int]:
    queue, raw = JobQueue(redis_url, NAMESPACE), redis.from_url(redis_url)
    try:
        return [int(await raw.hget(queue.record_key(i), "attempts")) for i in job_ids]
    finally:
        await raw.aclose()
        await queue.close()


def _consumers(redis_url: str) -> list[str]:
    async def read():
        raw = redis.from_url(redis_url)
        try:
            return [c["name"].decode() for c in await raw.xinfo_consumers(f"{NAMESPACE}:jobs", GROUP)]
        finally:
            await raw.aclose()

    return run(read())


def test_stopped_workers_leave_no_consumers_behind_in_the_group(jobs, workers, redis_url):
    """Each worker process is a new consumer: without clean-up the group grows with every restart."""
    stopped, _ = workers.start("worker-stopped", claim_idle_s=60)  # too patient to prune anyone
    _wait_for_jobs(jobs, [_submit(jobs, _request())])
    assert "worker-stopped" in _consumers(redis_url)
    stopped.send_signal(signal.SIGTERM)
    assert stopped.wait(timeout=30) == 0
    assert "worker-stopped" not in _consumers(redis_url), "a stopped worker left its consumer"

    killed, _ = workers.start("worker-killed", claim_idle_s=60)
    _wait_for_jobs(jobs, [_submit(jobs, _request())])
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert "worker-killed" in _consumers(redis_url)
    workers.start("worker-pruning")
    assert _wait_until(lambda: "worker-killed" not in _consumers(redis_url), 15), "a dead worker stayed"


def test_jobs_the_mesh_refuses_end_failed_with_the_error_stored(
    channel, jobs, workers, tiny_model_dir, tmp_path
):
    admin = adapters_pb2_grpc.AdaptersStub(channel)
    source = write_peft_adapter(tmp_path / "brief", tiny_model_dir, rank=4, targets=("q_proj",))
    admin.Create(adapters_pb2.CreateAdapterRequest(name="brief", source=str(source)), timeout=30)
    gone = common_pb2.GenerateRequest(adapter="brief")
    gone.MergeFrom(_request())
    gone_id = _submit(jobs, gone)
    admin.Delete(adapters_pb2.DeleteAdapterRequest(name="brief"), timeout=30)
    too_long_id = _submit(jobs, _request(max_new_tokens=100_000))  # past the context: refused as it runs
    ok_id = _submit(jobs, _request())

    _, metrics_port = workers.start("worker-f")
    gone_job, too_long_job, ok_job = _wait_for_jobs(jobs, [gone_id, too_long_id, ok_id])
    assert (gone_job.state, gone_job.error.code) == (FAILED, "NOT_FOUND")
    assert "'brief' is not registered" in gone_job.error.message
    assert (too_long_job.state, too_long_job.error.code) == (FAILED, "INVALID_ARGUMENT")
    assert "max_new_tokens" in too_long_job.error.message
    assert not gone_job.HasField("result") and gone_job.finished_at.seconds > 0
    assert ok_job.state == SUCCEEDED
    assert _wait_until(lambda: _metrics(metrics_port)["loraplex_jobs_failed_total"] == 2, 10)


def test_sigterm_drains_the_jobs_in_flight_before_the_worker_exits(jobs, workers, redis_url):
    job_ids = [_submit(jobs, _request(f"drain {i}", max_new_tokens=24)) for i in range(40)]
    worker, _ = workers.start("worker-d")
    assert _wait_until(lambda: _backlog(redis_url) < 40, 30)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    states = [jobs.Get(jobs_pb2.GetJobRequest(job_id=i)).state for i in job_ids]
    assert jobs_pb2.JOB_STATE_RUNNING not in states, "a job was left half-done"
    assert SUCCEEDED in states and jobs_pb2.JOB_STATE_QUEUED in states, states

    workers.start("worker-e")  # the rest is still queued for the next worker
    assert [job.state for job in _wait_for_jobs(jobs, job_ids)] == [SUCCEEDED] * 40


@pytest.fixture(scope="module")
def gateway(mesh, tiny_model_dir, tmp_path_factory) -> str:
    port = free_port()
    command = loraplex_command("gateway", "--router", mesh.router, "--model", str(tiny_model_dir))
    process = spawn([*command, "--port", str(port)], tmp_path_factory.mktemp("gateway") / "gateway.log")
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", process)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_all([process])


def _http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, json.load(reply)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def test_the_gateway_refuses_async_options_a_job_result_cannot_carry(gateway, tiny_model_dir):
    body = {"model": tiny_model_dir.name, "prompt": "hello", "max_tokens": 2}
    assert _http("POST", f"{gateway}/v1/async/completions", body)[0] == 202
    for extra, param in (({"logprobs": 2}, "logprobs"), ({"echo": True}, "echo")):
        status, reply = _http("POST", f"{gateway}/v1/async/completions", {**body, **extra})
        assert (status, reply.get("error", {}).get("param")) == (400, param), reply
        assert "POST /v1/completions" in reply["error"]["message"]


def test_the_gateway_answers_an_unknown_job_with_a_404_about_the_job(gateway):
    status, reply = _http("GET", f"{gateway}/v1/async/jobs/0123456789abcdef")
    assert (status, reply["error"]["code"], reply["error"]["param"]) == (404, "job_not_found", "job_id")
    assert "job '0123456789abcdef' is unknown or expired" in reply["error"]["message"]


class CallbackReceiver:
    """A local HTTP endpoint recording the JSON POSTed to each path (and the content types sent); the
    first POST to a path under /flaky/ is answered 503."""

    def __init__(self) -> None:
        self.posts: dict[str, list[dict]] = {}
        self.content_types: set[str] = set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                receiver.content_types.add(self.headers["Content-Type"])
                posts = receiver.posts.setdefault(self.path, [])
                posts.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(503 if self.path.startswith("/flaky/") and len(posts) == 1 else 204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def wait_for(self, path: str, count: int) -> list[dict]:
        assert _wait_until(lambda: len(self.posts.get(path, [])) >= count, 15), f"{path}: {self.posts}"
        return self.posts[path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receiver():
    receiver = CallbackReceiver()
    yield receiver
    receiver.close()


def test_a_finished_job_posts_its_outcome_as_the_gateway_shows_it_to_its_callback_url(
    jobs, workers, receiver
):
    ok_id = _submit(jobs, _request(), f"{receiver.url}/hooks/ok")
    bad_id = _submit(jobs, _request(max_new_tokens=100_000), f"{receiver.url}/hooks/bad")
    workers.start("worker-c")
    ok_job, bad_job = _wait_for_jobs(jobs, [ok_id, bad_id])

    (ok_post,) = receiver.wait_for("/hooks/ok", 1)
    assert ok_post == job_to_dict(ok_job) and ok_post["status"] == "succeeded"
    assert ok_post["result"]["usage"]["completion_tokens"] == 4
    (bad_post,) = receiver.wait_for("/hooks/bad", 1)
    assert bad_post == job_to_dict(bad_job) and bad_post["status"] == "failed"
    assert bad_post["error"]["code"] == "context_length_exceeded"  # as /v1/completions answers it
    assert receiver.content_types == {"application/json"}


def test_a_failing_callback_is_retried_a_little_and_never_changes_the_stored_outcome(
    jobs, workers, receiver, tmp_path
):
    flaky_id = _submit(jobs, _request(), f"{receiver.url}/flaky/1")
    nobody_url = f"http://127.0.0.1:{free_port()}/nobody-listens"
    nobody_id = _submit(jobs, _request(), nobody_url)
    workers.start("worker-r")
    flaky_job, nobody_job = _wait_for_jobs(jobs, [flaky_id, nobody_id])
    first, second = receiver.wait_for("/flaky/1", 2)  # 503, then delivered
    assert first == second == job_to_dict(flaky_job)

    log = tmp_path / "worker-r.log"
    assert _wait_until(lambda: "(try 3 of 3)" in log.read_text(), 15), "the unreachable callback gave up"
    assert log.read_text().count(f"callback to {nobody_url} failed") == 3
    assert (flaky_job.state, nobody_job.state) == (SUCCEEDED, SUCCEEDED)
    assert jobs.Get(jobs_pb2.GetJobRequest(job_id=nobody_id), timeout=10) == nobody_job
    assert len(receiver.posts["/flaky/1"]) == 2, "a delivered callback is not sent again"


def test_an_async_completion_over_rest_takes_a_callback_url(gateway, tiny_model_dir, workers, receiver):
    """REST submissions reach the callback too (it was accepted with 202 and never POSTed), and a URL
    the worker could not POST to is a 400 before anything is queued."""
    body = {"model": tiny_model_dir.name, "prompt": "hello", "max_tokens": 2}
    status, submitted = _http(
        "POST", f"{gateway}/v1/async/completions", {**body, "callback_url": f"{receiver.url}/rest/1"}
    )
    assert status == 202, submitted
    workers.start("worker-h")
    (posted,) = receiver.wait_for("/rest/1", 1)
    assert (posted["id"], posted["status"]) == (submitted["id"], "succeeded")
    status, refused = _http("POST", f"{gateway}/v1/async/completions", {**body, "callback_url": "ftp://x"})
    assert status == 400 and "is not an http(s) URL" in refused["error"]["message"], refused
