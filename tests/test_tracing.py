"""Tracing: one request is one trace, gateway -> router -> shard, with the spans an operator reads; an
async job's run is a trace of its own, linked to the request that submitted it.

An in-memory exporter sees only its own process, so the shard, the router, the gateway and a job
worker run here in one event loop (with a real redis-server and the tiny model), each through its real
`serve`."""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import uvicorn
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from loraplex.registry.records import HeldAdapter, ShardRecord
from loraplex.registry.store import Registry
from loraplex.router.gateway.app import GatewayConfig, create_app
from loraplex.router.server import RouterConfig
from loraplex.router.server import serve as serve_router
from loraplex.router.worker import WorkerConfig
from loraplex.router.worker import serve as serve_worker
from loraplex.shard.engine import EngineConfig
from loraplex.shard.server import ShardConfig
from loraplex.shard.server import serve as serve_shard
from loraplex.tools.processes import free_port, start_redis, stop_all

from peft_fixtures import write_peft_adapter

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"  # the client's own trace, sent as `traceparent`
CALLER_SPAN = "00f067aa0ba902b7"
SHARD_ID = "traced-shard"
GATEWAY_SPAN = "POST /v1/chat/completions"  # FastAPI's: method and route
SHARD_PHASES = ("shard.adapter_load", "shard.queue_wait", "shard.prefill", "shard.decode")


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Every span this process ends, kept in memory. The global provider can be set once per process,
    so it is put back afterwards (as OpenTelemetry's own test utilities do)."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    provider = TracerProvider()
    memory = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)
    yield memory
    provider.shutdown()


def _post(port: int, path: str, body: dict, headers: dict[str, str], status: int) -> str:
    """A POST to the gateway that must answer `status`; the response's text."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        text = response.read().decode()
        assert response.status == status, text
    finally:
        connection.close()
    return text


def _chat_stream(port: int, adapter: str, headers: dict[str, str]) -> list[dict]:
    """A streamed chat completion through the gateway; its SSE events."""
    body = {
        "model": adapter,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 4,
        "ignore_eos": True,
        "stream": True,
    }
    text = _post(port, "/v1/chat/completions", body, headers, 200)
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


async def _wait_for_spans(memory: InMemorySpanExporter, trace_id: int, names: set[str]) -> list[ReadableSpan]:
    """The trace's spans once all the named ones have ended (the last end a moment after the reply)."""
    deadline = time.monotonic() + 10
    while True:
        spans = [span for span in memory.get_finished_spans() if span.context.trace_id == trace_id]
        if names <= {span.name for span in spans} or time.monotonic() > deadline:
            return spans
        await asyncio.sleep(0.05)


async def _wait_for_new_trace(memory: InMemorySpanExporter) -> int:
    """The trace a gateway span started itself (its caller sent no traceparent)."""
    for _ in range(200):
        for span in memory.get_finished_spans():
            if span.name == GATEWAY_SPAN and span.parent is None:
                return span.context.trace_id
        await asyncio.sleep(0.05)
    raise AssertionError("no gateway span without a parent")


def _one(spans: list[ReadableSpan], name: str) -> ReadableSpan:
    found = [span for span in spans if span.name == name]
    assert len(found) == 1, f"{name}: {len(found)} spans in {sorted(span.name for span in spans)}"
    return found[0]


async def _wait_for_router(router: str) -> None:
    """Until the router routes (its snapshot has the shard): base-model requests are retried."""
    async with grpc.aio.insecure_channel(router) as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        request = common_pb2.GenerateRequest(prompt="hi", parameters={"max_new_tokens": 1})
        for _ in range(200):
            try:
                await generation.Generate(request, timeout=10)
                return
            except grpc.aio.AioRpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                await asyncio.sleep(0.05)
    raise AssertionError("the router never saw the shard")


async def _register_dead_replica(redis_url: str, namespace: str, router: str, adapter: str) -> None:
    """A shard that claims the adapter in a GPU slot but refuses connections: placement ranks it
    first (affinity), so the router's first forward fails and its retry reaches the real shard."""
    registry = Registry(redis_url, namespace)
    record = ShardRecord(
        "dead-shard",
        f"127.0.0.1:{free_port()}",
        "tiny",
        max_context=2048,
        max_running_requests=8,
        adapters=(HeldAdapter(adapter, 1, "gpu"),),
        reported_at=time.time(),
    )
    await registry.heartbeat(record, ttl_s=60)
    await registry.close()
    async with grpc.aio.insecure_channel(router) as channel:
        admin = adapters_pb2_grpc.AdaptersStub(channel)
        for _ in range(200):  # until the router's snapshot has it
            placed = await admin.Get(adapters_pb2.GetAdapterRequest(name=adapter), timeout=10)
            if any(placement.shard == "dead-shard" for placement in placed.placements):
                return
            await asyncio.sleep(0.05)
    raise AssertionError("the router never saw the dead replica")


def test_a_request_is_one_trace_from_gateway_to_shard_and_a_job_run_links_to_its_submission(
    exporter, redis_url, namespace, tiny_model_dir, tmp_path
):
    adapter_dir = write_peft_adapter(tmp_path / "adapter", tiny_model_dir)
    router_port, gateway_port = free_port(), free_port()
    router = f"127.0.0.1:{router_port}"

    async def scenario() -> None:
        stop = asyncio.Event()
        shard_config = ShardConfig(
            shard_id=SHARD_ID,
            model=str(tiny_model_dir),
            cache_dir=tmp_path / "cache",
            redis_url=redis_url,
            port=0,
            namespace=namespace,
            engine=EngineConfig(kv_cache_bytes=32 << 20, max_gpu_adapters=2),
            heartbeat_interval_s=0.2,
        )
        router_config = RouterConfig(
            redis_url, tiny_model_dir.name, port=router_port, namespace=namespace, refresh_interval_s=0.1
        )
        gateway = uvicorn.Server(
            uvicorn.Config(
                create_app(GatewayConfig(router=router, model=str(tiny_model_dir), port=gateway_port)),
                host="127.0.0.1",
                port=gateway_port,
                log_level="warning",
            )
        )
        worker_config = WorkerConfig(
            router, redis_url, "traced-worker", namespace, metrics_port=0, read_block_ms=100
        )
        tasks = [
            asyncio.create_task(serve_shard(shard_config, stop)),
            asyncio.create_task(serve_router(router_config, stop)),
            asyncio.create_task(gateway.serve()),
            asyncio.create_task(serve_worker(worker_config, stop)),
        ]
        try:
            await _wait_for_router(router)
            async with grpc.aio.insecure_channel(router) as channel:
                create = adapters_pb2.CreateAdapterRequest(name="traced", source=str(adapter_dir))
                await adapters_pb2_grpc.AdaptersStub(channel).Create(create, timeout=30)
            await _register_dead_replica(redis_url, namespace, router, "traced")
            while not gateway.started:
                await asyncio.sleep(0.05)
            exporter.clear()
            started_ns = time.time_ns()

            caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            events = await asyncio.to_thread(_chat_stream, gateway_port, "traced", caller)
            assert events[-1]["choices"][0]["finish_reason"] == "length"
            names = {GATEWAY_SPAN, "router.generate", "router.route", "shard.generate"}
            first = await _wait_for_spans(exporter, int(CALLER_TRACE, 16), {*names, *SHARD_PHASES})
            # everything the request did, on every hop, is in the caller's trace
            since = [span for span in exporter.get_finished_spans() if span.start_time >= started_ns]
            assert {span.context.trace_id for span in since} == {int(CALLER_TRACE, 16)}
            _check_first_trace(first)

            await asyncio.to_thread(_chat_stream, gateway_port, "traced", {})
            # a request without a traceparent starts its own trace; its adapter is in a slot by now
            new_trace = await _wait_for_new_trace(exporter)
            second = await _wait_for_spans(exporter, new_trace, {*names, *SHARD_PHASES})
            assert _one(second, "shard.generate").attributes["loraplex.adapter.tier"] == "gpu"
            assert _one(second, "shard.adapter_load").attributes["loraplex.adapter.tier"] == "gpu"
            assert _one(second, "shard.generate").attributes["rpc.grpc.status_code"] == 0

            await _check_stopped_requests(exporter, router)
            await _check_async_jobs(exporter, gateway_port, router)
            await _check_unary_calls(exporter, router, adapter_dir)
        finally:
            gateway.should_exit = True
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())


async def _check_stopped_requests(memory: InMemorySpanExporter, router: str) -> None:
    """A request its deadline ended is a failure on every hop, the shard's included; one its caller
    left is not, but says so."""
    long = common_pb2.GenerateRequest(prompt="Go on.", parameters={"max_new_tokens": 480, "ignore_eos": True})
    deadline_trace, cancelled_trace = (f"{n:032x}" for n in (0xDEAD, 0xCA11))
    async with grpc.aio.insecure_channel(router) as channel:
        generation = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await generation.Generate(
                long, timeout=0.3, metadata=(("traceparent", f"00-{deadline_trace}-{CALLER_SPAN}-01"),)
            )
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        call = generation.GenerateStream(
            long, timeout=30, metadata=(("traceparent", f"00-{cancelled_trace}-{CALLER_SPAN}-01"),)
        )
        async for _ in call:
            break
        call.cancel()
    for trace_id, code in (
        (deadline_trace, grpc.StatusCode.DEADLINE_EXCEEDED),
        (cancelled_trace, grpc.StatusCode.CANCELLED),
    ):
        spans = await _wait_for_spans(memory, int(trace_id, 16), {"router.generate", "shard.generate"})
        shard, request = _one(spans, "shard.generate"), _one(spans, "router.generate")
        failed = code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (not shard.status.is_ok, not request.status.is_ok) == (failed, failed), code
        assert shard.attributes["rpc.grpc.status_code"] == code.value[0], code
        assert request.attributes["rpc.grpc.status_code"] == code.value[0], code


def _submit_async_completion(port: int, adapter: str, headers: dict[str, str]) -> str:
    """An async completion submitted through the gateway; its job id."""
    body = {"model": adapter, "prompt": "Say something.", "max_tokens": 4}
    return json.loads(_post(port, "/v1/async/completions", body, headers, 202))["id"]


async def _wait_for_job_run(memory: InMemorySpanExporter, job_id: str, names: set[str]) -> list[ReadableSpan]:
    """The spans of the trace the worker ran the job in, once its `worker.job` span and the named ones
    have ended (a shard's span may end a moment after the job's)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for span in memory.get_finished_spans():
            if span.name == "worker.job" and span.attributes.get("loraplex.job.id") == job_id:
                return await _wait_for_spans(memory, span.context.trace_id, {"worker.job", *names})
        await asyncio.sleep(0.05)
    raise AssertionError(f"no worker.job span for job {job_id}")


async def _check_async_jobs(memory: InMemorySpanExporter, gateway_port: int, router: str) -> None:
    """A job runs in a trace of its own, linked to the span that queued it (router.submit, under the
    submitter's span), with the router's and shard's spans under it; a job that fails is a failed span."""
    ok_trace, failing_trace = (f"{n:032x}" for n in (0xA5, 0xFA11))
    caller = {"traceparent": f"00-{ok_trace}-{CALLER_SPAN}-01"}
    ok_id = await asyncio.to_thread(_submit_async_completion, gateway_port, "traced", caller)
    # past the context: Submit takes it, the shard refuses it when the job runs
    refused = common_pb2.GenerateRequest(prompt="Say nothing.", parameters={"max_new_tokens": 100_000})
    async with grpc.aio.insecure_channel(router) as channel:
        submitted = await jobs_pb2_grpc.JobsStub(channel).Submit(
            jobs_pb2.SubmitJobRequest(request=refused),
            timeout=10,
            metadata=(("traceparent", f"00-{failing_trace}-{CALLER_SPAN}-01"),),
        )
    failing_id = submitted.job_id

    submit_spans = await _wait_for_spans(
        memory, int(ok_trace, 16), {"POST /v1/async/completions", "router.submit"}
    )
    gateway, ok_submit = _one(submit_spans, "POST /v1/async/completions"), _one(submit_spans, "router.submit")
    assert gateway.parent.span_id == int(CALLER_SPAN, 16)
    assert ok_submit.parent.span_id == gateway.context.span_id
    assert ok_submit.attributes["loraplex.job.id"] == ok_id
    assert ok_submit.attributes["rpc.grpc.status_code"] == 0 and ok_submit.status.is_ok

    ok_run = await _wait_for_job_run(memory, ok_id, {"router.generate", "shard.generate"})
    job, request = _one(ok_run, "worker.job"), _one(ok_run, "router.generate")
    # a trace of its own, linked (not parented) to the submission
    assert job.parent is None and job.context.trace_id != int(ok_trace, 16)
    assert [(link.context.trace_id, link.context.span_id) for link in job.links] == [
        (int(ok_trace, 16), ok_submit.context.span_id)
    ]
    assert request.parent.span_id == job.context.span_id
    assert _one(ok_run, "shard.generate").parent is not None
    assert job.attributes["loraplex.job.attempt"] == 1
    assert job.status.is_ok and job.attributes["rpc.grpc.status_code"] == 0

    (failing_submit,) = await _wait_for_spans(memory, int(failing_trace, 16), {"router.submit"})
    assert failing_submit.parent.span_id == int(CALLER_SPAN, 16) and failing_submit.parent.is_remote
    failing_run = await _wait_for_job_run(memory, failing_id, {"router.generate"})
    failed = _one(failing_run, "worker.job")
    assert [(link.context.trace_id, link.context.span_id) for link in failed.links] == [
        (int(failing_trace, 16), failing_submit.context.span_id)
    ]
    assert not failed.status.is_ok and "max_new_tokens" in failed.status.description
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert _one(failing_run, "router.generate").parent.span_id == failed.context.span_id


async def _check_unary_calls(memory: InMemorySpanExporter, router: str, adapter_dir) -> None:
    """Admin calls and job look-ups have SERVER spans in the caller's trace, with their status."""
    job_trace, admin_trace = (f"{n:032x}" for n in (0x10B, 0xAD31))
    async with grpc.aio.insecure_channel(router) as channel:
        jobs, admin = jobs_pb2_grpc.JobsStub(channel), adapters_pb2_grpc.AdaptersStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await jobs.Get(
                jobs_pb2.GetJobRequest(job_id="no-such-job"),
                timeout=10,
                metadata=(("traceparent", f"00-{job_trace}-{CALLER_SPAN}-01"),),
            )
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as exists:
            await admin.Create(
                adapters_pb2.CreateAdapterRequest(name="traced", source=str(adapter_dir)),
                timeout=30,
                metadata=(("traceparent", f"00-{admin_trace}-{CALLER_SPAN}-01"),),
            )
        assert exists.value.code() == grpc.StatusCode.ALREADY_EXISTS
        await admin.Get(
            adapters_pb2.GetAdapterRequest(name="traced"),
            timeout=10,
            metadata=(("traceparent", f"00-{admin_trace}-{CALLER_SPAN}-01"),),
        )
    (get_job,) = await _wait_for_spans(memory, int(job_trace, 16), {"router.get_job"})
    assert (
        get_job.parent.span_id == int(CALLER_SPAN, 16)
        and get_job.attributes["loraplex.job.id"] == "no-such-job"
    )
    assert get_job.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not get_job.status.is_ok and "unknown or expired" in get_job.status.description
    admin_spans = await _wait_for_spans(
        memory, int(admin_trace, 16), {"router.adapters.create", "router.adapters.get"}
    )
    create, get = _one(admin_spans, "router.adapters.create"), _one(admin_spans, "router.adapters.get")
    assert create.attributes["loraplex.adapter.name"] == get.attributes["loraplex.adapter.name"] == "traced"
    assert create.attributes["rpc.grpc.status_code"] == grpc.StatusCode.ALREADY_EXISTS.value[0]
    assert not create.status.is_ok
    assert get.attributes["rpc.grpc.status_code"] == 0 and get.status.is_ok


def _check_first_trace(spans: list[ReadableSpan]) -> None:
    gateway = _one(spans, GATEWAY_SPAN)
    request = _one(spans, "router.generate")
    route = _one(spans, "router.route")
    forwards = sorted(
        (s for s in spans if s.name == "router.forward"), key=lambda s: s.attributes["loraplex.attempt"]
    )
    shard = _one(spans, "shard.generate")
    phases = {name: _one(spans, name) for name in SHARD_PHASES}

    # the caller's traceparent was honoured, and every hop hangs under the one before
    assert gateway.parent is not None and gateway.parent.span_id == int(CALLER_SPAN, 16)
    assert gateway.parent.is_remote
    assert request.parent.span_id == gateway.context.span_id
    assert route.parent.span_id == request.context.span_id
    assert [f.parent.span_id for f in forwards] == [request.context.span_id] * 2
    assert shard.parent.span_id == forwards[-1].context.span_id
    assert all(phase.parent.span_id == shard.context.span_id for phase in phases.values())

    assert gateway.attributes["http.response.status_code"] == 200
    assert route.attributes["loraplex.adapter.name"] == "traced"
    assert route.attributes["loraplex.adapter.version"] == 1
    assert route.attributes["loraplex.route.reason"] == "affinity"
    assert route.attributes["loraplex.shard.id"] == "dead-shard"
    assert list(route.attributes["loraplex.route.candidates"]) == ["dead-shard", SHARD_ID]
    # the dead replica's refusal is visible, then the retry that served the request
    assert [f.attributes["loraplex.shard.id"] for f in forwards] == ["dead-shard", SHARD_ID]
    assert [f.attributes["loraplex.attempt"] for f in forwards] == [1, 2]
    assert not forwards[0].status.is_ok and forwards[1].status.is_ok
    assert request.attributes["loraplex.shard.id"] == SHARD_ID
    assert request.attributes["gen_ai.usage.output_tokens"] == 4

    assert shard.attributes["loraplex.shard.id"] == SHARD_ID
    assert shard.attributes["loraplex.adapter.name"] == "traced"
    assert shard.attributes["loraplex.adapter.version"] == 1
    assert shard.attributes["gen_ai.usage.input_tokens"] > 0
    assert shard.attributes["gen_ai.usage.output_tokens"] == 4
    assert list(shard.attributes["gen_ai.response.finish_reasons"]) == ["length"]
    # the first request for a new adapter fetched it from its source (the disk cache was empty)
    assert shard.attributes["loraplex.adapter.tier"] == "source"
    assert phases["shard.adapter_load"].attributes["loraplex.adapter.tier"] == "source"
    # the phases follow one another inside the request span
    order = [phases[name] for name in SHARD_PHASES]
    assert shard.start_time <= order[0].start_time
    for before, after in itertools.pairwise(order):
        assert before.end_time <= after.start_time
    assert order[-1].end_time <= shard.end_time


def _run(environ: dict[str, str], code: str) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter (tracer providers are process-wide) with only these OTEL_*."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    return subprocess.run(
        [sys.executable, "-c", code], env={**env, **environ}, capture_output=True, text=True, timeout=60
    )


def _probe(environ: dict[str, str], code: str) -> str:
    result = _run(environ, code)
    assert result.returncode == 0, result.stderr
    return result.stdout


PROBE = """
import sys
from opentelemetry import trace
from loraplex.protos.telemetry import configure_tracing
on = configure_tracing("loraplex-probe")
with trace.get_tracer("probe").start_as_current_span("probe-span") as span:
    recording = span.is_recording()
print(on, type(trace.get_tracer_provider()).__name__, recording, "opentelemetry.sdk" in sys.modules)
"""


@pytest.mark.parametrize("environ", [{}, {"OTEL_TRACES_EXPORTER": "none"}])
def test_without_an_exporter_tracing_stays_the_no_op_provider(environ):
    assert _probe(environ, PROBE).split() == ["False", "ProxyTracerProvider", "False", "False"]


def test_the_console_exporter_prints_spans_under_the_service_name():
    out = _probe({"OTEL_TRACES_EXPORTER": "console"}, PROBE + "trace.get_tracer_provider().shutdown()")
    assert out.splitlines()[0].split() == ["True", "TracerProvider", "True", "True"]
    assert '"name": "probe-span"' in out and '"service.name": "loraplex-probe"' in out
    named = _probe(
        {"OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "edge"},
        PROBE + "trace.get_tracer_provider().shutdown()",
    )
    assert '"service.name": "edge"' in named


class _Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A stand-in OpenTelemetry collector: keeps what it is sent."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request, context):
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def test_otlp_exports_over_grpc_to_a_collector():
    """OTEL_TRACES_EXPORTER=otlp sends OTLP/gRPC (opentelemetry-proto's messages under our protobuf)."""
    collector = _Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        environ = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
        _probe(environ, PROBE + "trace.get_tracer_provider().shutdown()")
    finally:
        server.stop(grace=None)
    exported = [
        (resource.resource, span.name)
        for request in collector.requests
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]
    assert [name for _, name in exported] == ["probe-span"]
    attributes = {a.key: a.value.string_value for a in exported[0][0].attributes}
    assert attributes["service.name"] == "loraplex-probe"


def test_an_exporter_nothing_provides_fails_at_start_and_says_what_is_installed():
    code = "from loraplex.protos.telemetry import configure_tracing; configure_tracing('x')"
    result = _run({"OTEL_TRACES_EXPORTER": "zipkin_json"}, code)
    assert result.returncode != 0
    assert "'zipkin_json', which no installed package provides" in result.stderr
    assert "console" in result.stderr and "otlp_proto_grpc" in result.stderr


READ_TRACE = "0af7651916cd43dd8448eb211c80319c"  # a caller's trace for the reads below


def _get(port: int, path: str, headers: dict[str, str]) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def test_a_job_look_up_and_a_model_list_through_the_gateway_are_one_trace(exporter, redis_url, namespace):
    """GET /v1/async/jobs/{id} and GET /v1/models hand the caller's trace on to the router, as
    generations do: the router's span hangs under the gateway's."""
    router_port, gateway_port = free_port(), free_port()
    router = f"127.0.0.1:{router_port}"

    async def scenario() -> None:
        stop = asyncio.Event()
        router_config = RouterConfig(redis_url, "tiny", port=router_port, namespace=namespace)
        app = create_app(GatewayConfig(router=router, model="tiny", port=gateway_port))
        gateway = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=gateway_port, log_level="warning")
        )
        tasks = [asyncio.create_task(serve_router(router_config, stop)), asyncio.create_task(gateway.serve())]
        try:
            while not gateway.started:
                await asyncio.sleep(0.05)
            caller = {"traceparent": f"00-{READ_TRACE}-{CALLER_SPAN}-01"}
            assert await asyncio.to_thread(_get, gateway_port, "/v1/async/jobs/no-such-job", caller) == 404
            assert await asyncio.to_thread(_get, gateway_port, "/v1/models", caller) == 200
            hops = {"GET /v1/async/jobs/{job_id}": "router.get_job", "GET /v1/models": "router.adapters.list"}
            spans = await _wait_for_spans(exporter, int(READ_TRACE, 16), {*hops, *hops.values()})
            for gateway_name, router_name in hops.items():
                served = _one(spans, gateway_name)
                assert served.parent.span_id == int(CALLER_SPAN, 16)
                assert _one(spans, router_name).parent.span_id == served.context.span_id, router_name
        finally:
            gateway.should_exit = True
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())


def test_an_admin_call_or_job_look_up_its_deadline_ended_is_a_failed_span(exporter, namespace, tmp_path):
    """A unary call that gRPC ended at the caller's deadline (here: Redis froze under the router) carries
    DEADLINE_EXCEEDED and is failed, as router.generate is; not CANCELLED, which means the caller left."""
    redis_port, router_port = free_port(), free_port()
    router = f"127.0.0.1:{router_port}"
    redis = start_redis(redis_port, tmp_path, tmp_path / "redis.log")

    async def scenario() -> None:
        stop = asyncio.Event()
        config = RouterConfig(
            f"redis://127.0.0.1:{redis_port}/0", "tiny", port=router_port, namespace=namespace
        )
        served = asyncio.create_task(serve_router(config, stop))
        try:
            async with grpc.aio.insecure_channel(router) as channel:
                await asyncio.wait_for(channel.channel_ready(), timeout=10)
                os.kill(redis.pid, signal.SIGSTOP)
                metadata = (("traceparent", f"00-{READ_TRACE}-{CALLER_SPAN}-01"),)
                calls = (
                    adapters_pb2_grpc.AdaptersStub(channel).Get(
                        adapters_pb2.GetAdapterRequest(name="any"), timeout=0.5, metadata=metadata
                    ),
                    jobs_pb2_grpc.JobsStub(channel).Get(
                        jobs_pb2.GetJobRequest(job_id="any"), timeout=0.5, metadata=metadata
                    ),
                )
                for call in calls:
                    with pytest.raises(grpc.aio.AioRpcError) as expired:
                        await call
                    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            names = {"router.adapters.get", "router.get_job"}
            spans = await _wait_for_spans(exporter, int(READ_TRACE, 16), names)
            for name in names:
                span = _one(spans, name)
                assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
                assert not span.status.is_ok, name
        finally:
            os.kill(redis.pid, signal.SIGCONT)
            stop.set()
            await served

    try:
        asyncio.run(scenario())
    finally:
        stop_all([redis])
