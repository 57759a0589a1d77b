"""OpenAI's completions, chat completions and models routes over the router's Generation service.

`n` choices and lists of prompts become one router request each, run concurrently and merged, so they
batch together on the shards. Streams follow OpenAI's chunk format and end with `data: [DONE]`.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from loraplex.protos.v1 import common_pb2
from loraplex.router.convert import collect_response
from loraplex.router.gateway.backend import Chunk, RouterClient, merge_streams
from loraplex.router.gateway.convert import (
    OPENAI_FINISH,
    SSE_HEADERS,
    ModelNames,
    not_found_hint,
    run_until_disconnect,
    sampling_parameters,
    sse_events,
    with_seed_offset,
)
from loraplex.router.gateway.errors import APIError
from loraplex.router.gateway.schemas import (
    REFUSED_CHAT,
    REFUSED_COMPLETION,
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
    refused_field,
)

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the shard's
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default


@dataclass
class Choices:
    """Bookkeeping for the router requests behind one OpenAI response."""

    requests: list[common_pb2.GenerateRequest]
    prompt_of: list[int]  # choice index -> prompt index (usage counts each prompt once)
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: int = 0

    def count(self, index: int, chunk: Chunk) -> None:
        if chunk.finish_reason:
            self.prompt_tokens[self.prompt_of[index]] = chunk.usage.prompt_tokens
            self.completion_tokens += chunk.usage.completion_tokens

    def usage(self) -> dict:
        prompt = sum(self.prompt_tokens.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.completion_tokens,
            "total_tokens": prompt + self.completion_tokens,
        }


def build_router(client: RouterClient, names: ModelNames) -> APIRouter:
    api = APIRouter()

    @api.get("/v1/models")
    async def list_models() -> dict:
        adapters = await client.list_adapters()
        base = {"id": names.base, "object": "model", "created": 0, "owned_by": "loraplex", "root": names.base}
        models = [base] + [
            {
                "id": adapter.name,
                "object": "model",
                "created": adapter.created_at.seconds,
                "owned_by": "loraplex",
                "root": adapter.name,
                "parent": names.base,
            }
            for adapter in adapters
        ]
        return {"object": "list", "data": models}

    @api.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict:
        listing = await list_models()
        for model in listing["data"]:
            if model["id"] == model_id:
                return model
        raise not_found_hint(APIError(404, ""), model_id, names)

    @api.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request):
        choices = completion_choices(body, names)
        return await _respond(request, client, body, names, choices, _CompletionFormat(body))

    @api.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        choices = _chat_choices(body, names)
        return await _respond(request, client, body, names, choices, _ChatFormat(body))

    return api


async def _respond(
    request: Request,
    client: RouterClient,
    body: SamplingFields,
    names: ModelNames,
    choices: Choices,
    shape: _CompletionFormat | _ChatFormat,
):
    async def open_all() -> list[AsyncIterator[Chunk]]:
        try:
            return await client.open_streams(choices.requests)
        except APIError as error:
            raise not_found_hint(error, body.model, names) from error

    if body.stream:
        streams = await run_until_disconnect(request, open_all())
        if isinstance(streams, Response):  # the client left before the first token
            return streams
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream_events(shape, choices, streams, include_usage)
        return StreamingResponse(
            sse_events(request, events), media_type="text/event-stream", headers=SSE_HEADERS
        )

    async def whole() -> dict:
        responses = [await collect_response(stream) for stream in await open_all()]
        for index, response in enumerate(responses):
            choices.prompt_tokens[choices.prompt_of[index]] = response.usage.prompt_tokens
            choices.completion_tokens += response.usage.completion_tokens
        return shape.response([shape.choice(i, r) for i, r in enumerate(responses)], choices.usage())

    return await run_until_disconnect(request, whole())


async def _stream_events(
    shape: _CompletionFormat | _ChatFormat,
    choices: Choices,
    streams: Sequence[AsyncIterator[Chunk]],
    include_usage: bool,
) -> AsyncIterator[dict | str]:
    usage_field = {"usage": None} if include_usage else {}
    for first in shape.stream_start(len(streams)):
        yield {**first, **usage_field}
    async for index, chunk in merge_streams(streams):
        choices.count(index, chunk)
        for event in shape.stream_chunk(index, chunk):
            yield {**event, **usage_field}
    if include_usage:
        yield {**shape.envelope(chunk=True), "choices": [], "usage": choices.usage()}
    yield "data: [DONE]\n\n"


def _check_common(body: SamplingFields, refused: dict[str, tuple]) -> None:
    if not body.model:
        raise APIError.bad_request("model is required: the base model's id or an adapter name", "model")
    name = refused_field(body.model_extra, refused)
    if name:
        raise APIError.bad_request(f"{name} is not supported by loraplex; leave it out", name)
    if body.stream_options and not body.stream:  # as OpenAI and vLLM answer
        raise APIError.bad_request("stream_options is only allowed with stream: true", "stream_options")
    if body.stream_options and body.stream_options.continuous_usage_stats:
        raise APIError.bad_request(
            "continuous_usage_stats is not supported (token counts come with a generation's last "
            "chunk); include_usage alone gives one usage chunk at the end of the stream",
            "stream_options.continuous_usage_stats",
        )
    if any(not text for text in body.stop_list()):  # as vLLM: an empty stop string would end every answer
        raise APIError.bad_request("stop strings must not be empty", "stop")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name):
            raise APIError.bad_request(
                f"{name} is not supported; use repetition_penalty (> 1 penalises)", name
            )


def _sampling(body: SamplingFields, max_tokens: int | None, logprobs: bool, top_logprobs: int):
    return sampling_parameters(
        max_new_tokens=max_tokens,
        temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=body.stop_list(),
        stop_token_ids=body.stop_token_ids or (),
        repetition_penalty=body.repetition_penalty,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def completion_choices(body: CompletionRequest, names: ModelNames) -> Choices:
    _check_common(body, REFUSED_COMPLETION)
    if body.suffix:
        raise APIError.bad_request("suffix (insertion) is not supported", "suffix")
    if body.best_of not in (None, 1, body.n):
        raise APIError.bad_request("best_of is not supported beyond best_of == n", "best_of")
    prompts = _prompts(body.prompt)
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    parameters = _sampling(body, max_tokens, body.logprobs is not None, body.logprobs or 0)
    requests, prompt_of = [], []
    for prompt_index, prompt in enumerate(prompts):
        # an echo needs the prompt's tokens for their log-probs, or for the text of token ids
        echo_tokens = body.echo and (body.logprobs is not None or not isinstance(prompt, str))
        request = common_pb2.GenerateRequest(
            adapter=names.adapter_for(body.model), parameters=parameters, decoder_input_details=echo_tokens
        )
        if isinstance(prompt, str):
            request.prompt = prompt
        else:
            request.prompt_token_ids.extend(prompt)
        for choice in range(body.n):
            requests.append(with_seed_offset(request, choice))
            prompt_of.append(prompt_index)
    return Choices(requests, prompt_of)


def _prompts(prompt: str | list) -> list[str | list[int]]:
    if prompt == "" or (isinstance(prompt, list) and "" in prompt):
        raise APIError.bad_request("a prompt is empty: send some text", "prompt")
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError.bad_request("prompt is empty", "prompt")
    if all(isinstance(item, int) for item in prompt):
        return [prompt]
    if any(isinstance(item, list) and not item for item in prompt):
        raise APIError.bad_request("a prompt of token ids is empty", "prompt")
    return list(prompt)


def _chat_choices(body: ChatCompletionRequest, names: ModelNames) -> Choices:
    _check_common(body, REFUSED_CHAT)
    if not body.messages:
        raise APIError.bad_request("messages is empty: send at least one message", "messages")
    if body.tools:
        raise APIError.bad_request("tool calling is not supported", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError.bad_request("only response_format {'type': 'text'} is supported", "response_format")
    if body.top_logprobs and not body.logprobs:
        raise APIError.bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    request = common_pb2.GenerateRequest(
        adapter=names.adapter_for(body.model),
        parameters=_sampling(body, max_tokens, body.logprobs, body.top_logprobs or 0),
        messages=[
            common_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
            for m in body.messages
        ],
    )
    return Choices([with_seed_offset(request, choice) for choice in range(body.n)], [0] * body.n)


class _Format:
    object_name = ""
    chunk_object_name = ""
    id_prefix = ""

    def __init__(self, body: SamplingFields) -> None:
        self.id = f"{self.id_prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = body.model

    def envelope(self, chunk: bool = False) -> dict:
        return {
            "id": self.id,
            "object": self.chunk_object_name if chunk else self.object_name,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": None,
        }

    def response(self, choices: list[dict], usage: dict) -> dict:
        return {**self.envelope(), "choices": choices, "usage": usage}

    def stream_start(self, num_choices: int) -> list[dict]:
        return []


class _CompletionFormat(_Format):
    object_name = chunk_object_name = "text_completion"
    id_prefix = "cmpl"

    def __init__(self, body: CompletionRequest) -> None:
        super().__init__(body)
        self.logprobs = body.logprobs is not None
        self.echo = body.echo
        # each prompt's text, None for token ids; choices are prompt-major, `n` to a prompt
        self.prompts = [p if isinstance(p, str) else None for p in _prompts(body.prompt)]
        self.n = body.n
        self._offsets: dict[int, int] = {}

    def choice(self, index: int, response: common_pb2.GenerateResponse) -> dict:
        text = response.text
        tokens = list(response.tokens)
        if self.echo:
            text = self._echoed(index, response.prefill_tokens) + text
            tokens = list(response.prefill_tokens) + tokens
        return {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(index, tokens) if self.logprobs else None,
            "finish_reason": OPENAI_FINISH.get(response.finish_reason),
        }

    def stream_chunk(self, index: int, chunk: Chunk) -> list[dict]:
        text, tokens = chunk.text, list(chunk.tokens)
        if self.echo and index not in self._offsets:
            text = self._echoed(index, chunk.prefill_tokens) + text
            tokens = list(chunk.prefill_tokens) + tokens
        choice = {
            "index": index,
            "text": text,
            "logprobs": self._logprobs(index, tokens) if self.logprobs else None,
            "finish_reason": OPENAI_FINISH.get(chunk.finish_reason),
        }
        self._offsets.setdefault(index, 0)
        return [{**self.envelope(chunk=True), "choices": [choice]}]

    def _echoed(self, index: int, prefill_tokens: Sequence[common_pb2.Token]) -> str:
        """The choice's prompt as sent, or for token ids the text of the shard's prompt tokens."""
        prompt = self.prompts[index // self.n]
        return "".join(token.text for token in prefill_tokens) if prompt is None else prompt

    def _logprobs(self, index: int, tokens: list[common_pb2.Token]) -> dict:
        """The legacy completions shape; text offsets continue across a stream's chunks."""
        offsets, offset = [], self._offsets.get(index, 0)
        for token in tokens:
            offsets.append(offset)
            offset += len(token.text)
        self._offsets[index] = offset
        # An echoed prompt's first token has no log-prob (nothing precedes it; NaN on the wire): null
        # there, as OpenAI does, since JSON has no NaN.
        scored = [not math.isnan(token.logprob) for token in tokens]
        return {
            "tokens": [token.text for token in tokens],
            "token_logprobs": [
                token.logprob if ok else None for token, ok in zip(tokens, scored, strict=True)
            ],
            "top_logprobs": [
                {top.text: top.logprob for top in token.top_logprobs} if ok else None
                for token, ok in zip(tokens, scored, strict=True)
            ],
            "text_offset": offsets,
        }


class _ChatFormat(_Format):
    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"
    id_prefix = "chatcmpl"

    def __init__(self, body: ChatCompletionRequest) -> None:
        super().__init__(body)
        self.logprobs = body.logprobs

    def choice(self, index: int, response: common_pb2.GenerateResponse) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": response.text},
            "logprobs": self._logprobs(response.tokens) if self.logprobs else None,
            "finish_reason": OPENAI_FINISH.get(response.finish_reason),
        }

    def stream_start(self, num_choices: int) -> list[dict]:
        return [
            {
                **self.envelope(chunk=True),
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
            for index in range(num_choices)
        ]

    def stream_chunk(self, index: int, chunk: Chunk) -> list[dict]:
        events = []
        if chunk.text or chunk.tokens:
            choice = {
                "index": index,
                "delta": {"content": chunk.text},
                "logprobs": self._logprobs(chunk.tokens) if self.logprobs else None,
                "finish_reason": None,
            }
            events.append({**self.envelope(chunk=True), "choices": [choice]})
        if chunk.finish_reason:
            choice = {
                "index": index,
                "delta": {},
                "logprobs": None,
                "finish_reason": OPENAI_FINISH.get(chunk.finish_reason),
            }
            events.append({**self.envelope(chunk=True), "choices": [choice]})
        return events

    @staticmethod
    def _logprobs(tokens: Sequence[common_pb2.Token]) -> dict:
        def entry(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {
                    **entry(token.text, token.logprob),
                    "top_logprobs": [entry(top.text, top.logprob) for top in token.top_logprobs],
                }
                for token in tokens
            ]
        }
