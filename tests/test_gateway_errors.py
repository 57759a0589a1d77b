"""The gateway's error handlers on their own: an unexpected exception still reaches the client as JSON
in the shape its SDK parses (OpenAI's under /v1, TGI's elsewhere), never as a bare text/plain 500; and
values the shard would refuse are refused at the gateway's edge, naming the field."""

import json
import subprocess
import sys

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from loraplex.protos.v1 import common_pb2, jobs_pb2
from loraplex.router.gateway.app import GatewayConfig, create_app
from loraplex.router.gateway.convert import sse_events
from loraplex.router.gateway.errors import APIError, install_error_handlers
from loraplex.router.gateway.jobs_api import job_to_dict
from loraplex.router.gateway.schemas import CompletionRequest, TGIParameters
from loraplex.shard.context_limits import ContextExceeded
from loraplex.shard.sampling import SamplingParams
from loraplex.shard.sampling_limits import REPETITION_PENALTY_RANGE


def _failing_app() -> FastAPI:
    app = FastAPI()
    install_error_handlers(app)

    async def broken() -> None:
        raise ValueError("a bug")

    app.post("/v1/completions")(broken)
    app.post("/generate")(broken)
    return app


def test_an_unexpected_error_is_a_500_in_the_callers_shape():
    client = TestClient(_failing_app(), raise_server_exceptions=False)
    openai = client.post("/v1/completions", json={})
    assert openai.status_code == 500 and openai.headers["content-type"] == "application/json"
    error = openai.json()["error"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert "ValueError" in error["message"] and "log" in error["message"]
    tgi = client.post("/generate", json={})
    assert tgi.status_code == 500 and tgi.json()["error_type"] == "generation"


def test_an_error_mid_stream_is_an_event_in_the_callers_shape_and_an_openai_stream_still_ends():
    app = FastAPI()

    async def events():
        yield {"text": "first"}
        raise APIError(503, "every shard went away")

    async def stream(request: Request) -> StreamingResponse:
        return StreamingResponse(sse_events(request, events()), media_type="text/event-stream")

    app.post("/v1/completions")(stream)
    app.post("/generate_stream")(stream)
    client = TestClient(app)
    openai = client.post("/v1/completions").text.split("\n\n")
    assert openai[0] == 'data: {"text": "first"}' and openai[2:] == ["data: [DONE]", ""]
    assert json.loads(openai[1].removeprefix("data: "))["error"]["message"] == "every shard went away"
    tgi = client.post("/generate_stream").text.split("\n\n")
    assert tgi[2:] == [""] and json.loads(tgi[1].removeprefix("data: "))["error_type"]


def _gateway() -> TestClient:
    """The real app; no router behind it, which requests refused by validation never reach."""
    return TestClient(create_app(GatewayConfig(router="127.0.0.1:9", model="tiny")))


@pytest.mark.parametrize("penalty", [0.0, 0.001, 100.5, 1e6])
def test_a_repetition_penalty_the_shard_refuses_is_a_400_naming_the_field(penalty):
    client = _gateway()
    completion = {"model": "tiny", "prompt": "hi", "repetition_penalty": penalty}
    chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "repetition_penalty": penalty}
    for path, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
        response = client.post(path, json=body)
        assert response.status_code == 400, (path, response.text)
        error = response.json()["error"]
        assert error["param"] == "repetition_penalty" and error["type"] == "invalid_request_error"
    tgi = client.post("/generate", json={"inputs": "hi", "parameters": {"repetition_penalty": penalty}})
    assert tgi.status_code == 422 and tgi.json()["error_type"] == "validation"
    assert "parameters.repetition_penalty" in tgi.json()["error"]


@pytest.mark.parametrize("penalty", [*REPETITION_PENALTY_RANGE, 1.0])
def test_a_repetition_penalty_the_gateway_accepts_the_shard_accepts_after_the_wire(penalty):
    """The bounds themselves pass both, though the proto's float32 carries 0.01 as 0.0099999998."""
    assert (
        CompletionRequest(model="tiny", prompt="hi", repetition_penalty=penalty).repetition_penalty == penalty
    )
    assert TGIParameters(repetition_penalty=penalty).repetition_penalty == penalty
    on_the_wire = common_pb2.SamplingParameters(repetition_penalty=penalty).repetition_penalty
    SamplingParams(max_new_tokens=1, repetition_penalty=on_the_wire)


def test_the_gateway_process_does_not_load_torch():
    """It shares the shard's sampling bounds through a module light enough to import anywhere."""
    code = "import sys, loraplex.router.gateway.app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("context", [ContextExceeded(2048, 3000), ContextExceeded(2048, 1000, 2000)])
def test_a_context_error_parses_back_from_the_shards_message(context):
    """The gateway recognises the shard's message by this parse; a change to one wording must not
    silently turn its errors back into generic 400s."""
    assert ContextExceeded.parse(context.message()) == context
    assert ContextExceeded.parse(f"{context.message()} ") is None
    assert ContextExceeded.parse("max_new_tokens must be at least 1, got 0") is None


def test_an_async_job_past_the_context_reports_openais_context_error():
    job = jobs_pb2.Job(job_id="j", state=jobs_pb2.JOB_STATE_FAILED)
    job.error.code = "INVALID_ARGUMENT"
    job.error.message = ContextExceeded(2048, 1000, 2000).message()
    error = job_to_dict(job)["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "context_length_exceeded",
        "prompt",
        "invalid_request_error",
    )
    assert error["message"].startswith("This model's maximum context length is 2048 tokens.")
