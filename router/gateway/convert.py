"""What the HTTP routes share: naming the base model or an adapter, building the router's
GenerateRequest, and running a request only while its client is still connected."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request
from starlette.responses import Response

from loraplex.protos.v1 import common_pb2
from loraplex.router.gateway.errors import APIError, sse_error

T = TypeVar("T")

OPENAI_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_EOS: "stop",
}
TGI_FINISH = {
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_STOP: "stop_sequence",
    common_pb2.FINISH_REASON_EOS: "eos_token",
}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class ModelNames:
    """The base model's public id (what /v1/models lists) and the other names that also mean it."""

    base: str
    aliases: frozenset[str]

    def adapter_for(self, model: str | None) -> str:
        """The router's adapter field for an OpenAI `model` or a TGI `adapter_id`: empty is the base."""
        if model is None or model == "" or model == self.base or model in self.aliases:
            return ""
        return model


def not_found_hint(error: APIError, model: str, names: ModelNames) -> APIError:
    """The router's NOT_FOUND speaks gRPC; an HTTP caller is told where to look instead."""
    if error.status != 404:
        return error
    return APIError(
        404,
        f"the model {model!r} does not exist: it is neither the base model ({names.base!r}) nor a "
        "registered adapter; GET /v1/models lists what is served",
        param="model",
        code="model_not_found",
    )


def sampling_parameters(
    *,
    max_new_tokens: int | None,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    stop: Iterable[str],
    repetition_penalty: float | None,
    stop_token_ids: Iterable[int] = (),
    ignore_eos: bool = False,
    logprobs: bool = False,
    top_logprobs: int = 0,
) -> common_pb2.SamplingParameters:
    parameters = common_pb2.SamplingParameters(
        temperature=temperature,
        top_k=max(0, top_k or 0),
        stop=list(stop),
        stop_token_ids=list(stop_token_ids),
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )
    if max_new_tokens is not None:
        parameters.max_new_tokens = max_new_tokens
    if top_p is not None:
        parameters.top_p = top_p
    if seed is not None:
        parameters.seed = seed % 2**64
    if repetition_penalty is not None:
        parameters.repetition_penalty = repetition_penalty
    return parameters


def with_seed_offset(request: common_pb2.GenerateRequest, offset: int) -> common_pb2.GenerateRequest:
    """The i-th of `n` choices: the same request, a different (still reproducible) seed."""
    if offset == 0 or not request.parameters.HasField("seed"):
        return request
    copy = common_pb2.GenerateRequest()
    copy.CopyFrom(request)
    copy.parameters.seed = (request.parameters.seed + offset) % 2**64
    return copy


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T | Response:
    """Run a whole request, or a stream's opening (up to its first token, which a long prefill or a
    queue can delay), cancelling it and so its generation if the client goes away meanwhile."""
    task = asyncio.ensure_future(work)

    async def client_left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(client_left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        watcher.cancel()
    if task.cancelled():
        return Response(status_code=499)
    return task.result()


async def sse_events(request: Request, events: AsyncIterator[dict | str]) -> AsyncIterator[str]:
    """Server-sent events from dicts (JSON) or ready strings; an error mid-stream becomes an event."""
    try:
        async for event in events:
            yield event if isinstance(event, str) else f"data: {json.dumps(event)}\n\n"
    except APIError as error:
        yield sse_error(request, error)
