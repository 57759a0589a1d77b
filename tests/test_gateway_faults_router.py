"""What an HTTP client sees when something behind the gateway fails: a real router over a real
redis-server, test_router's stand-in shards, the gateway app served by uvicorn in this process, and
the clients users have (httpx, the OpenAI SDK, huggingface_hub's InferenceClient).

Before a stream's first byte a failure is an HTTP status in the caller's error shape; after it, an
error event (OpenAI's `{"error": {...}}` then `[DONE]`, as vLLM sends; TGI's `{"error", "error_type"}`),
never a stream that just stops. A router that cannot be reached is a 503 that says to retry, and the
gateway finds the router again soon after it is back."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
import httpx2 as httpx
import openai
import pytest
import uvicorn
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import GenerationError, OverloadedError
from test_router import StoppedShard, _start_shard
from test_router_edge import _gauge

from loraplex.protos.v1 import common_pb2, shard_pb2_grpc
from loraplex.registry.store import Registry
from loraplex.router.gateway.app import GatewayConfig, create_app
from loraplex.router.server import RouterConfig, serve
from loraplex.tools.processes import free_port, start_redis, stop_all

CHAT = [{"role": "user", "content": "hi"}]
INFLIGHT = "loraplex_router_inflight_requests"


class TokenThenStopped(StoppedShard):
    """test_router's StoppedShard, where every request (chat too) streams one token before it holds."""

    async def _generate(self, request, time_remaining, metadata):
        self.calls += 1
        token = common_pb2.Token(id=7, text="partial", logprob=-0.5)
        yield common_pb2.GenerateStreamResponse(text="partial", tokens=[token])
        await asyncio.Event().wait()


@asynccontextmanager
async def _gateway(router: str, request_timeout_s: float = 30.0) -> AsyncIterator[str]:
    """The gateway app on a free port in this event loop; yields its base URL."""
    port = free_port()
    app = create_app(GatewayConfig(router=router, model="m", port=port, request_timeout_s=request_timeout_s))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the gateway did not start"
        await asyncio.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def _router(
    redis_url: str, namespace: str, port: int, metrics_port: int = 0
) -> tuple[asyncio.Task, asyncio.Event]:
    stop = asyncio.Event()
    config = RouterConfig(
        redis_url,
        "m",
        port=port,
        namespace=namespace,
        refresh_interval_s=60,
        drain_timeout_s=0.2,
        metrics_port=metrics_port,
    )
    return asyncio.create_task(serve(config, stop)), stop


@dataclass
class Mesh:
    url: str  # the gateway's
    shard: shard_pb2_grpc.ShardServicer
    shard_server: grpc.aio.Server
    stop_router: asyncio.Event
    metrics_port: int  # the router's

    async def inflight(self) -> float:
        return await asyncio.to_thread(_gauge, self.metrics_port, INFLIGHT)

    async def inflight_once_settled(self) -> float:
        """The router's requests in flight, once they reach 0 or 5 s have passed."""
        deadline = time.monotonic() + 5
        while (inflight := await self.inflight()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return inflight

    async def stop_shard_once_called(self, calls: int) -> None:
        """Stop the (Stopped) shard's server once it holds `calls` requests and their first tokens
        are out: the router fails them with UNAVAILABLE, "retry the request"."""
        while self.shard.calls < calls:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        self.shard.draining.set()
        await self.shard_server.stop(0.1)


@asynccontextmanager
async def _mesh(
    redis_url: str,
    namespace: str,
    shard: shard_pb2_grpc.ShardServicer | None = None,
    request_timeout_s: float = 30.0,
    **load: int,
) -> AsyncIterator[Mesh]:
    """One stand-in shard (a HeldShard unless given) with the given loads, a router and the gateway,
    healthy."""
    registry = Registry(redis_url, namespace)
    servicer, shard_server = await _start_shard(registry, "s", shard, **{"max_running_requests": 8, **load})
    port, metrics_port = free_port(), free_port()
    router, stop = _router(redis_url, namespace, port, metrics_port)
    try:
        async with _gateway(f"127.0.0.1:{port}", request_timeout_s) as url:
            async with httpx.AsyncClient() as client:
                while (await client.get(f"{url}/health")).status_code != 200:
                    await asyncio.sleep(0.05)
            yield Mesh(url, servicer, shard_server, stop, metrics_port)
    finally:
        stop.set()
        await router
        await shard_server.stop(None)
        await registry.close()


async def _events(client: httpx.AsyncClient, url: str, body: dict) -> tuple[int, list]:
    """POST a stream; its status and its events (JSON, or the string `[DONE]`), or the error body."""
    async with client.stream("POST", url, json=body, timeout=30) as response:
        if response.status_code != 200:
            return response.status_code, [json.loads(await response.aread())]
        lines = [line async for line in response.aiter_lines() if line]
    payloads = [line.removeprefix("data: ") for line in lines]
    return 200, [payload if payload == "[DONE]" else json.loads(payload) for payload in payloads]


STREAMS = [
    ("/v1/completions", {"model": "m", "prompt": "p", "stream": True}),
    ("/v1/completions", {"model": "m", "prompt": "p", "stream": True, "n": 2}),
    ("/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True}),
    ("/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True, "n": 2}),
]


def test_a_shard_failing_mid_stream_ends_openai_streams_with_an_error_event(redis_url, namespace):
    """Guard (right before this audit too): the router's UNAVAILABLE after tokens becomes OpenAI's
    error event, then `[DONE]`, for completions and chat, n = 1 and 2; no choice is reported finished
    (a truncated stream would look like success), and the SDK raises."""

    async def scenario() -> None:
        async with _mesh(redis_url, namespace, TokenThenStopped()) as mesh, httpx.AsyncClient() as client:
            sdk = openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="-", max_retries=0)

            async def through_the_sdk() -> list:
                received = []
                with pytest.raises(openai.APIError) as raised:
                    stream = await sdk.chat.completions.create(model="m", messages=CHAT, stream=True)
                    async for chunk in stream:
                        received.append(chunk)
                assert "retry the request" in raised.value.message
                return received

            calls = sum(body.get("n", 1) for _, body in STREAMS) + 1
            streams = asyncio.gather(
                *(_events(client, mesh.url + path, body) for path, body in STREAMS), through_the_sdk()
            )
            await mesh.stop_shard_once_called(calls)
            *answers, sdk_chunks = await streams
            await sdk.close()

        assert any(chunk.choices and chunk.choices[0].delta.content == "partial" for chunk in sdk_chunks)
        for (path, body), (status, events) in zip(STREAMS, answers, strict=True):
            assert status == 200, (path, body)
            *chunks, error, done = events
            assert done == "[DONE]" and set(error) == {"error"}, (path, body, events)
            assert error["error"]["type"] == "service_unavailable"
            assert "retry the request" in error["error"]["message"]
            texts = [c["choices"][0].get("text") or c["choices"][0]["delta"].get("content") for c in chunks]
            assert texts.count("partial") == body.get("n", 1), (path, body, events)
            assert all(c["choices"][0]["finish_reason"] is None for c in chunks), (path, body, events)

    asyncio.run(scenario())


def test_a_shard_failing_mid_stream_sends_tgi_every_token_it_got_then_the_error(redis_url, namespace):
    """TGI streams each token as it comes, then `{"error", "error_type"}`. The gateway holds one token
    back (the last carries the end); it dropped that token when the generation failed instead of
    ending, so a TGI client got the error alone."""

    async def scenario() -> None:
        async with _mesh(redis_url, namespace, TokenThenStopped()) as mesh, httpx.AsyncClient() as client:
            tgi = AsyncInferenceClient(model=mesh.url, timeout=30)

            async def through_inference_client() -> list:
                received = []
                with pytest.raises(GenerationError, match="retry the request"):
                    async for output in await tgi.text_generation("p", stream=True, details=True):
                        received.append(output.token.text)
                return received

            streams = asyncio.gather(
                _events(client, f"{mesh.url}/generate_stream", {"inputs": "p"}), through_inference_client()
            )
            await mesh.stop_shard_once_called(2)
            (status, events), tokens = await streams

        assert status == 200
        assert [event["token"]["text"] for event in events[:-1]] == ["partial"], events
        assert events[-1]["error_type"] == "generation" and "retry the request" in events[-1]["error"]
        assert tokens == ["partial"]

    asyncio.run(scenario())


COMPLETION = {"model": "m", "prompt": "hi", "max_tokens": 2}


def _says_router_is_unreachable(error: dict) -> bool:
    return (
        error["type"] == "service_unavailable"
        and "router" in error["message"]
        and "retry" in error["message"]
    )


def test_the_gateway_finds_a_router_that_comes_back_within_about_a_second(redis_url, namespace):
    """Started before its router, the gateway answers 503 in OpenAI's shape, saying the router is
    unreachable and to retry (it said "failed to connect to all addresses; ..."). gRPC waits 1.6x
    longer after each failed connection attempt, up to 2 minutes: the gateway went on answering 503
    that long after its router was back. Here the router's port drops connections until the gateway
    has tried it 5 times (~9 s in with gRPC's defaults, whose next try comes 5-8 s later; ~4 s with
    tries a second apart), then the router starts."""

    async def scenario() -> None:
        registry = Registry(redis_url, namespace)
        shard, shard_server = await _start_shard(registry, "s", max_running_requests=8)
        shard.release.set()
        attempts: list[float] = []

        async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            attempts.append(time.monotonic())
            writer.close()

        port = free_port()
        listener = await asyncio.start_server(drop, "127.0.0.1", port)
        try:
            async with _gateway(f"127.0.0.1:{port}") as url, httpx.AsyncClient(timeout=10) as client:
                while len(attempts) < 5:
                    response = await client.post(f"{url}/v1/completions", json=COMPLETION)
                    assert response.status_code == 503, response.text
                    assert _says_router_is_unreachable(response.json()["error"]), response.text
                    await asyncio.sleep(0.1)
                listener.close()
                await listener.wait_closed()
                router, stop = _router(redis_url, namespace, port)
                back = time.monotonic()
                try:
                    while (await client.post(f"{url}/v1/completions", json=COMPLETION)).status_code != 200:
                        assert time.monotonic() - back < 3.5, "the gateway is still not reaching its router"
                        await asyncio.sleep(0.05)
                    assert (await client.get(f"{url}/health")).status_code == 200
                finally:
                    stop.set()
                    await router
        finally:
            listener.close()
            await shard_server.stop(None)
            await registry.close()

    asyncio.run(scenario())


def test_a_router_going_away_is_a_503_before_the_first_byte_and_an_error_event_after(redis_url, namespace):
    """The router stops (its drain grace over) with two streams on it: the one that had a token gets
    an error event saying to retry, then `[DONE]`; the one still waiting gets a 503 in OpenAI's shape.
    Both said only gRPC's "Cancelling all calls". Later requests get the same 503 at once."""

    async def scenario() -> None:
        async with _mesh(redis_url, namespace, StoppedShard()) as mesh, httpx.AsyncClient() as client:
            streams = asyncio.gather(
                _events(
                    client, f"{mesh.url}/v1/completions", {"model": "m", "prompt": "chunk", "stream": True}
                ),
                _events(
                    client, f"{mesh.url}/v1/completions", {"model": "m", "prompt": "wait", "stream": True}
                ),
            )
            while mesh.shard.calls < 2:
                await asyncio.sleep(0.01)
            mesh.stop_router.set()
            (started, events), (waiting, body) = await streams
            later = await client.post(
                f"{mesh.url}/v1/chat/completions", json={"model": "m", "messages": CHAT}
            )

        assert started == 200 and events[0]["choices"][0]["text"] == "partial"
        assert events[-1] == "[DONE]" and _says_router_is_unreachable(events[-2]["error"]), events
        assert waiting == 503 and _says_router_is_unreachable(body[0]["error"]), body
        assert later.status_code == 503 and _says_router_is_unreachable(later.json()["error"]), later.text

    asyncio.run(scenario())


def test_the_request_timeout_is_a_504_before_the_first_token_and_an_error_event_after(redis_url, namespace):
    """`--request-timeout` passes (the stand-in shard holds every request): before a token it is a 504
    in each API's shape, after one an error event; each names the limit to change (it said gRPC's
    "Deadline Exceeded"). The deadline also ends the requests at the router."""

    async def scenario() -> None:
        async with (
            _mesh(redis_url, namespace, StoppedShard(), request_timeout_s=1.0) as mesh,
            httpx.AsyncClient(timeout=30) as client,
        ):
            url = mesh.url
            answers = await asyncio.gather(
                _events(client, f"{url}/v1/completions", {"model": "m", "prompt": "chunk", "stream": True}),
                _events(
                    client, f"{url}/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True}
                ),
                client.post(f"{url}/v1/completions", json={"model": "m", "prompt": "wait"}),
                client.post(f"{url}/generate", json={"inputs": "wait"}),
            )
            assert await mesh.inflight_once_settled() == 0
        (streamed, events), (waiting, body), whole, tgi = answers

        assert streamed == 200 and events[0]["choices"][0]["text"] == "partial" and events[-1] == "[DONE]"
        for error in (events[-2]["error"], body[0]["error"], whole.json()["error"]):
            assert error["type"] == "timeout" and "--request-timeout" in error["message"], error
        assert waiting == 504 and whole.status_code == 504
        assert tgi.status_code == 504 and "--request-timeout" in tgi.json()["error"], tgi.text

    asyncio.run(scenario())


def test_a_client_leaving_mid_stream_ends_its_requests_at_the_router(redis_url, namespace):
    """Guard: a client that stops reading after the first chunk of a 3-choice stream, whose shard has
    nothing more to send, has the 3 requests cancelled at the router at once."""

    async def scenario() -> None:
        async with _mesh(redis_url, namespace, StoppedShard()) as mesh, httpx.AsyncClient() as client:
            body = {"model": "m", "prompt": "chunk", "stream": True, "n": 3}
            async with client.stream("POST", f"{mesh.url}/v1/completions", json=body) as response:
                lines = response.aiter_lines()  # held: dropping it would close the response early
                assert "partial" in await anext(lines)
                assert await mesh.inflight() == 3
            assert await mesh.inflight_once_settled() == 0

    asyncio.run(scenario())


def test_every_shard_saturated_is_a_429_each_client_reads_as_overload(redis_url, namespace):
    """Guard: the router's RESOURCE_EXHAUSTED is 429, as README says and TGI answers a full queue
    (vLLM has no queue limit): the OpenAI SDK raises RateLimitError (after its own retries, off here),
    InferenceClient OverloadedError, a stream is refused before its first byte."""

    async def scenario() -> None:
        load = {"max_running_requests": 4, "running_requests": 4, "waiting_requests": 4}
        async with _mesh(redis_url, namespace, **load) as mesh, httpx.AsyncClient() as client:
            sdk = openai.AsyncOpenAI(base_url=f"{mesh.url}/v1", api_key="-", max_retries=0)
            with pytest.raises(openai.RateLimitError, match="saturated"):
                await sdk.completions.create(model="m", prompt="hi")
            await sdk.close()
            status, body = await _events(
                client, f"{mesh.url}/v1/chat/completions", {"model": "m", "messages": CHAT, "stream": True}
            )
            assert status == 429 and body[0]["error"]["type"] == "rate_limit_error"
            assert "retry" in body[0]["error"]["message"]
            with pytest.raises(OverloadedError, match="saturated"):
                await AsyncInferenceClient(model=mesh.url, timeout=30).text_generation("hi")
            assert mesh.shard.calls == 0

    asyncio.run(scenario())


def test_async_jobs_answer_503_naming_redis_when_it_stops_answering_or_is_gone(namespace, tmp_path):
    """A Redis that stops answering (SIGSTOP: a frozen node) fails the router's job calls after its
    10 s socket timeout, as UNAVAILABLE naming the job queue; the gateway gave up first, at 10 s, with
    a bare 504 "Deadline Exceeded". A Redis that is gone is a 503 at once."""
    redis_port = free_port()
    redis = start_redis(redis_port, tmp_path, tmp_path / "redis.log")
    redis_url = f"redis://127.0.0.1:{redis_port}/0"

    async def scenario() -> None:
        port = free_port()
        router, stop = _router(redis_url, namespace, port)
        try:
            async with _gateway(f"127.0.0.1:{port}") as url, httpx.AsyncClient(timeout=30) as client:
                while (await client.get(f"{url}/health")).status_code != 200:
                    await asyncio.sleep(0.05)
                submitted = await client.post(f"{url}/v1/async/completions", json=COMPLETION)
                assert submitted.status_code == 202, submitted.text
                job = f"{url}/v1/async/jobs/{submitted.json()['id']}"
                redis.send_signal(signal.SIGSTOP)
                try:
                    frozen = await asyncio.gather(
                        client.post(f"{url}/v1/async/completions", json=COMPLETION), client.get(job)
                    )
                finally:
                    redis.send_signal(signal.SIGCONT)
                stop_all([redis])
                gone = await asyncio.gather(
                    client.post(f"{url}/v1/async/completions", json=COMPLETION), client.get(job)
                )
        finally:
            stop.set()
            await router
        for response in (*frozen, *gone):
            error = response.json()["error"]
            assert response.status_code == 503 and error["type"] == "service_unavailable", response.text
            assert "Redis" in error["message"] and "retry" in error["message"], response.text

    try:
        asyncio.run(scenario())
    finally:
        stop_all([redis])
