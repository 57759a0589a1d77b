"""Text Generation Inference's routes: `/generate`, `/generate_stream` and `/` (either, by `stream`),
in TGI's request and response shapes, so `huggingface_hub.InferenceClient` works unchanged.

TGI streams one event per token, so the router is always asked for per-token details; the last event
carries the whole `generated_text` and, when asked for, the finish details.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from importlib.metadata import version

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from loraplex.protos.v1 import common_pb2
from loraplex.router.convert import collect_response
from loraplex.router.gateway.backend import Chunk, RouterClient
from loraplex.router.gateway.convert import (
    SSE_HEADERS,
    TGI_FINISH,
    ModelNames,
    not_found_hint,
    run_until_disconnect,
    sampling_parameters,
    sse_events,
)
from loraplex.router.gateway.errors import APIError
from loraplex.router.gateway.schemas import MAX_STOP, REFUSED_TGI, TGIParameters, TGIRequest, refused_field


def build_router(client: RouterClient, names: ModelNames) -> APIRouter:
    api = APIRouter()

    async def open_stream(body: TGIRequest) -> AsyncIterator[Chunk]:
        try:
            return await client.open_stream(_generate_request(body, names))
        except APIError as error:
            raise not_found_hint(error, body.parameters.adapter_id or "", names) from error

    async def generate(body: TGIRequest, request: Request) -> dict:
        async def whole() -> dict:
            response = await collect_response(await open_stream(body))
            return _generated(body, response)

        return await run_until_disconnect(request, whole())

    async def generate_stream(body: TGIRequest, request: Request) -> Response:
        if body.parameters.decoder_input_details:  # TGI's rule: a stream has no place for the prompt
            raise APIError.bad_request(
                "decoder_input_details is not supported when streaming tokens; use /generate",
                "decoder_input_details",
            )
        stream = await run_until_disconnect(request, open_stream(body))
        if isinstance(stream, Response):  # the client left before the first token
            return stream
        return StreamingResponse(
            sse_events(request, _token_events(body, stream)),
            media_type="text/event-stream",
            headers=SSE_HEADERS,
        )

    @api.get("/info")
    async def info() -> dict:
        """TGI's description of the endpoint (huggingface_hub's get_endpoint_info), as far as the gateway
        knows it: the base model and the request limits it enforces."""
        return {
            "model_id": names.base,
            "model_pipeline_tag": "text-generation",
            "max_best_of": 1,
            "max_stop_sequences": MAX_STOP,
            "max_client_batch_size": 1,
            "router": "loraplex",
            "version": version("loraplex"),
        }

    @api.post("/generate", response_model=None)
    async def generate_route(body: TGIRequest, request: Request):
        return await generate(body, request)

    @api.post("/generate_stream", response_model=None)
    async def generate_stream_route(body: TGIRequest, request: Request):
        return await generate_stream(body, request)

    @api.post("/", response_model=None)
    async def compat_route(body: TGIRequest, request: Request):
        """TGI's root route: a stream when `stream` is true, else a one-element list."""
        if body.stream:
            return await generate_stream(body, request)
        result = await generate(body, request)
        return [result] if isinstance(result, dict) else result

    return api


def _generate_request(body: TGIRequest, names: ModelNames) -> common_pb2.GenerateRequest:
    p = body.parameters
    if not body.inputs:  # TGI's words; the router's would name its own fields
        raise APIError.bad_request("Input validation error: `inputs` cannot be empty", "inputs")
    if p.best_of not in (None, 1):
        raise APIError.bad_request("best_of is not supported", "best_of")
    if p.grammar:
        raise APIError.bad_request("grammar (constrained decoding) is not supported", "grammar")
    name = refused_field(p.model_extra, REFUSED_TGI)
    if name:
        raise APIError.bad_request(f"{name} is not supported by loraplex; leave it out", name)
    temperature = _temperature(p)
    if temperature > 0 and p.seed is None:  # as TGI: a sampled answer reports the seed that replays it
        p.seed = secrets.randbits(63)
    return common_pb2.GenerateRequest(
        adapter=names.adapter_for(p.adapter_id),
        prompt=body.inputs,
        details=True,
        decoder_input_details=p.decoder_input_details,
        parameters=sampling_parameters(
            max_new_tokens=p.max_new_tokens,
            temperature=temperature,
            top_p=p.top_p,
            top_k=p.top_k,
            seed=p.seed,
            stop=p.stop or (),
            repetition_penalty=p.repetition_penalty,
            logprobs=True,
            top_logprobs=p.top_n_tokens or 0,
        ),
    )


def _temperature(p: TGIParameters) -> float:
    """As TGI: it samples when asked to or when any logits warper is set (a temperature other than 1,
    top_k, top_p < 1), else it decodes greedily, whatever the temperature (0 here)."""
    warped = p.temperature not in (None, 1.0) or bool(p.top_k) or (p.top_p is not None and p.top_p < 1)
    if not (p.do_sample or warped):
        return 0.0
    return 1.0 if p.temperature is None else p.temperature


def _token(token: common_pb2.Token) -> dict:
    return {"id": token.id, "text": token.text, "logprob": token.logprob, "special": token.special}


def _top_tokens(token: common_pb2.Token) -> list[dict]:
    return [
        {"id": top.id, "text": top.text, "logprob": top.logprob, "special": top.special}
        for top in token.top_logprobs
    ]


def _generated_text(body: TGIRequest, text: str, stop_text: str) -> str:
    """TGI's generated_text keeps the stop sequence that ended it, to the end of its token (the shard's
    text leaves that out and sends it as stop_text), and starts with the prompt when
    return_full_text is set."""
    text += stop_text
    return body.inputs + text if body.parameters.return_full_text else text


def _generated(body: TGIRequest, response: common_pb2.GenerateResponse) -> dict:
    p = body.parameters
    text = _generated_text(body, response.text, response.stop_text)
    result: dict = {"generated_text": text}
    if p.details:
        result["details"] = {
            "finish_reason": TGI_FINISH.get(response.finish_reason, "length"),
            "generated_tokens": response.usage.completion_tokens,
            "seed": p.seed,
            "prefill": [
                {"id": t.id, "text": t.text, "logprob": t.logprob if i else None}
                for i, t in enumerate(response.prefill_tokens)
            ],
            "tokens": [_token(token) for token in response.tokens],
            "top_tokens": [_top_tokens(token) for token in response.tokens] if p.top_n_tokens else None,
            "best_of_sequences": None,
        }
    return result


async def _token_events(body: TGIRequest, stream: AsyncIterator[Chunk]) -> AsyncIterator[dict]:
    """One event per token; each is held back until the next arrives, so the last can carry the end."""
    p = body.parameters
    pending: dict | None = None
    texts: list[str] = []
    index = 0
    try:
        async for chunk in stream:
            texts.append(chunk.text)
            for token in chunk.tokens:
                if pending is not None:
                    yield pending
                index += 1
                pending = {
                    "index": index,
                    "token": _token(token),
                    "top_tokens": _top_tokens(token) if p.top_n_tokens else None,
                    "generated_text": None,
                    "details": None,
                }
            if chunk.finish_reason:
                if pending is None:  # nothing was generated; TGI still ends with an event
                    pending = {"index": 0, "token": {"id": 0, "text": "", "logprob": 0.0, "special": True}}
                pending["generated_text"] = _generated_text(body, "".join(texts), chunk.stop_text)
                pending["details"] = (
                    {
                        "finish_reason": TGI_FINISH.get(chunk.finish_reason, "length"),
                        "generated_tokens": chunk.usage.completion_tokens,
                        "input_length": chunk.usage.prompt_tokens,
                        "seed": p.seed,
                    }
                    if p.details
                    else None
                )
    except APIError:  # the generation failed mid-way: TGI sends every token it got, then the error
        if pending is not None:
            yield pending
        raise
    if pending is not None:
        yield pending
