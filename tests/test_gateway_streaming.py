"""The gateway's streams against a scripted router (a Generation server in the test, driven through
the ASGI interface), where timing matters: a client that leaves before the first token cancels the
router call at once, and `n` streams are read no faster than the client reads the merged stream."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi.testclient import TestClient

from loraplex.protos.rpc import create_server
from loraplex.protos.v1 import common_pb2, generation_pb2_grpc
from loraplex.router.gateway.app import GatewayConfig, create_app
from loraplex.router.gateway.backend import merge_streams

CHAT = [{"role": "user", "content": "hi"}]


class SlowRouter(generation_pb2_grpc.GenerationServicer):
    """A router whose first token never comes (a long prefill, a queue): it records each call it
    starts and each call its client cancels."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.cancelled: list[str] = []

    async def GenerateStream(self, request, context):
        self.started.append(request.prompt or request.messages[0].content)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.append(request.prompt or request.messages[0].content)
            raise
        yield common_pb2.GenerateStreamResponse()  # never reached: makes this a stream handler


@asynccontextmanager
async def _gateway_over(servicer: SlowRouter):
    """The real gateway app, its lifespan running, over the scripted router on loopback."""
    server, port, _ = create_server("127.0.0.1:0", [])
    generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server)
    await server.start()
    app = create_app(GatewayConfig(router=f"127.0.0.1:{port}", model="tiny"))
    try:
        async with app.router.lifespan_context(app):
            yield app
    finally:
        await server.stop(None)


async def _post_then_leave(app, path: str, body: dict, leave_after_s: float) -> list[dict]:
    """POST through ASGI as uvicorn would; the client disconnects after leave_after_s. Returns what the
    app sent, which must come within a few seconds of the client leaving."""
    pending = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]
    sent: list[dict] = []

    async def receive() -> dict:
        if pending:
            return pending.pop(0)
        await asyncio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"gateway")],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=leave_after_s + 5)
    return sent


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": "tiny", "prompt": "p", "stream": True}),
        ("/v1/completions", {"model": "tiny", "prompt": "p", "stream": True, "n": 3}),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT, "stream": True}),
        ("/generate_stream", {"inputs": "p"}),
        ("/", {"inputs": "p", "stream": True}),
    ],
)
def test_a_client_that_leaves_before_the_first_token_cancels_its_generation(path, body):
    """A stream's response starts with its first token (so errors before it keep their status);
    until then the gateway still watches the client, as it does for a whole response, so a long
    prefill or a queued request is not run for nobody."""

    async def scenario() -> tuple[SlowRouter, list[dict]]:
        router = SlowRouter()
        async with _gateway_over(router) as app:
            sent = await _post_then_leave(app, path, body, leave_after_s=0.5)
            deadline = asyncio.get_running_loop().time() + 5
            while (
                len(router.cancelled) < len(router.started) and asyncio.get_running_loop().time() < deadline
            ):
                await asyncio.sleep(0.05)
        return router, sent

    router, sent = asyncio.run(scenario())
    assert len(router.started) == body.get("n", 1)
    assert sorted(router.cancelled) == sorted(router.started), "the router call outlived its client"
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 499


def test_merged_choices_are_read_no_faster_than_the_client_reads():
    """`n` streams merged into one SSE stream: a client that stops reading must stop the reads from
    the router too (gRPC's flow control then holds the rest), not have the gateway buffer whole
    generations in memory."""
    num_chunks = 500
    pulled = [0, 0]

    async def choice(index: int) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        for _ in range(num_chunks):
            await asyncio.sleep(0)
            pulled[index] += 1
            yield common_pb2.GenerateStreamResponse(text="x")

    async def scenario() -> list[int]:
        merged = merge_streams([choice(0), choice(1)])
        await anext(merged)
        for _ in range(200):  # the client reads nothing for a while
            await asyncio.sleep(0)
        read_ahead = list(pulled)
        await merged.aclose()
        return read_ahead

    read_ahead = asyncio.run(scenario())
    assert sum(read_ahead) <= 8, f"read {read_ahead} chunks ahead of a client that took one"


def test_merged_choices_still_arrive_whole_and_interleaved():
    async def choice(index: int, count: int) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        for position in range(count):
            await asyncio.sleep(0)
            yield common_pb2.GenerateStreamResponse(text=f"{index}:{position}")

    async def scenario() -> list[tuple[int, str]]:
        return [(i, c.text) async for i, c in merge_streams([choice(0, 50), choice(1, 30), choice(2, 1)])]

    merged = asyncio.run(scenario())
    for index, count in ((0, 50), (1, 30), (2, 1)):
        assert [text for i, text in merged if i == index] == [f"{index}:{p}" for p in range(count)]
    assert {i for i, _ in merged[:10]} == {0, 1, 2}, "choices interleave as their chunks arrive"


def test_continuous_usage_stats_is_refused_not_ignored():
    """vLLM's `stream_options.continuous_usage_stats` puts usage on every chunk; the gateway cannot
    (a shard counts the prompt's tokens only at the end), so it says so rather than send nulls."""
    client = TestClient(create_app(GatewayConfig(router="127.0.0.1:9", model="tiny")))
    options = {"include_usage": True, "continuous_usage_stats": True}
    for path, body in (
        ("/v1/completions", {"model": "tiny", "prompt": "hi"}),
        ("/v1/chat/completions", {"model": "tiny", "messages": CHAT}),
    ):
        response = client.post(path, json={**body, "stream": True, "stream_options": options})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "stream_options.continuous_usage_stats"
