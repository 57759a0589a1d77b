"""HTTP errors for the gateway: gRPC statuses from the router become HTTP codes, and every error is
sent in the body shape the caller's client parses: OpenAI's under /v1, TGI's on the TGI routes."""

from __future__ import annotations

import json
from itertools import takewhile

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from loraplex.shard.context_limits import ContextExceeded

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
OPENAI_TYPES = {
    400: "invalid_request_error",
    404: "not_found_error",
    409: "invalid_request_error",
    429: "rate_limit_error",
    499: "cancelled",
    503: "service_unavailable",
    504: "timeout",
}
# TGI's error_type values, which huggingface_hub maps to its exception classes.
TGI_TYPES = {400: "validation", 404: "validation", 422: "validation", 429: "overloaded"}


class APIError(Exception):
    """An error with the HTTP status it deserves and a message that says what to fix."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        context: ContextExceeded | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.context = context  # the request did not fit the shard's context: said in each API's words

    @classmethod
    def bad_request(cls, message: str, param: str | None = None) -> APIError:
        return cls(400, message, param=param)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> APIError:
        status = HTTP_STATUS.get(error.code(), 500)
        code = "model_not_found" if error.code() == grpc.StatusCode.NOT_FOUND else error.code().name.lower()
        message = error.details() or error.code().name
        context = None
        if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
            context = ContextExceeded.parse(message)
        return cls(status, message, code=code, context=context)

    def openai_body(self, chat: bool = False) -> dict:
        body = {
            "message": self.message,
            "type": OPENAI_TYPES.get(self.status, "server_error"),
            "param": self.param,
            "code": self.code,
        }
        if self.context is not None:  # OpenAI's (and vLLM's) words and code, which clients match on
            body |= openai_context_error(self.context, "messages" if chat else "prompt")
        return {"error": body}

    def tgi_body(self) -> dict:
        message = self.message if self.context is None else tgi_context_error(self.context)
        return {"error": message, "error_type": TGI_TYPES.get(self.status, "generation")}


def openai_context_error(context: ContextExceeded, field: str) -> dict:
    """OpenAI's error for a request past the context. LiteLLM and CrewAI, among others, recognise
    the code and the 'maximum context length' wording (to trim the conversation, or fall back)."""
    if context.max_new_tokens is None:
        message = (
            f"This model's maximum context length is {context.max_context} tokens. However, your "
            f"{field} has {context.prompt_tokens} tokens. Please reduce the length of the {field}."
        )
    else:
        message = (
            f"This model's maximum context length is {context.max_context} tokens. However, you "
            f"requested {context.prompt_tokens + context.max_new_tokens} tokens ({context.prompt_tokens} "
            f"in the {field}, {context.max_new_tokens} in the completion). Please reduce the length of "
            f"the {field} or completion."
        )
    return {"message": message, "param": field, "code": "context_length_exceeded"}


def tgi_context_error(context: ContextExceeded) -> str:
    """TGI's validation message for a request past the context (max_input_tokens, max_total_tokens)."""
    if context.max_new_tokens is None:
        return (
            f"Input validation error: `inputs` must have less than {context.max_context} tokens. "
            f"Given: {context.prompt_tokens}"
        )
    return (
        f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {context.max_context}. "
        f"Given: {context.prompt_tokens} `inputs` tokens and {context.max_new_tokens} `max_new_tokens`"
    )


def is_tgi_route(request: Request) -> bool:
    return not request.url.path.startswith("/v1/")


def is_chat_route(request: Request) -> bool:
    return request.url.path == "/v1/chat/completions"


def error_response(request: Request, error: APIError) -> JSONResponse:
    body = error.tgi_body() if is_tgi_route(request) else error.openai_body(is_chat_route(request))
    status = 422 if is_tgi_route(request) and error.status == 400 else error.status
    return JSONResponse(body, status_code=status)


def sse_error(request: Request, error: APIError) -> str:
    """An error after the stream started: the status is already sent, so it goes in an event. An
    OpenAI stream still ends with `[DONE]`, as vLLM's does, for clients that read until it."""
    if is_tgi_route(request):
        return f"data: {json.dumps(error.tgi_body())}\n\n"
    return f"data: {json.dumps(error.openai_body(is_chat_route(request)))}\n\ndata: [DONE]\n\n"


def describe_validation_error(error: RequestValidationError) -> tuple[str, str | None]:
    """Pydantic's error list as one sentence naming the offending field. The field (`param`) is where
    the errors' locations meet: a value matching no member of a union (`stop`: a string or a list)
    has an error per member, each located under a member's name (`stop.str`, `stop.list[str]`)."""
    messages, locations = [], []
    for item in error.errors():
        location = [str(part) for part in item.get("loc", ()) if part != "body"]
        locations.append(location)
        field = ".".join(location)
        if item.get("type") == "json_invalid":
            messages.append(f"the body is not valid JSON ({item.get('ctx', {}).get('error', 'parse error')})")
        elif field:
            messages.append(f"{field}: {item.get('msg')}")
        else:
            messages.append(str(item.get("msg")))
    common = takewhile(lambda parts: len(set(parts)) == 1, zip(*locations, strict=False))
    shared = [parts[0] for parts in common]
    param = ".".join(shared or (locations[0] if locations else [])) or None
    return "; ".join(messages) or "invalid request", param


def install_error_handlers(app) -> None:
    async def on_api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(request, error)

    async def on_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(error)
        return error_response(request, APIError.bad_request(message, param))

    async def on_http_error(request: Request, error: HTTPException) -> JSONResponse:
        return error_response(request, APIError(error.status_code, str(error.detail)))

    async def on_unexpected_error(request: Request, error: Exception) -> JSONResponse:
        """A bug, still answered in the shape the caller's client parses (the server logs the traceback)."""
        message = f"internal error ({type(error).__name__}); the gateway's log has the details"
        return error_response(request, APIError(500, message, code="internal_error"))

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(Exception, on_unexpected_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(HTTPException, on_http_error)
