"""gRPC plumbing every server shares: one error type mapped to status codes, and server creation
with health checking and reflection (so grpcurl works against any component)."""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import logging
import signal
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

T = TypeVar("T")
log = logging.getLogger("loraplex.rpc")

# Keepalive. A peer that stops answering without closing its connection (a frozen process, a node
# that dropped off the network) otherwise holds every call on that connection until TCP gives up, many
# minutes later: a frozen shard would hold each request on its GenerateMany stream until the caller's
# deadline, or for ever. Clients ping after KEEPALIVE_S without a frame from the peer and give up on
# the connection (UNAVAILABLE, which the router retries on another shard) when a ping goes unanswered.
KEEPALIVE_S = 10.0
MIN_KEEPALIVE_S = 1.0  # servers accept pings this often; a client pinging more often is refused
SERVER_KEEPALIVE_S = 30.0  # servers ping too, so a vanished router's requests stop decoding
# A client tries a peer that went away again at least this often: gRPC's default backoff grows to
# 2 minutes, and a gateway kept answering 503 that long after its router was back.
MAX_RECONNECT_BACKOFF_MS = 1000
# status messages past this are cut: non-ASCII bytes triple when percent-encoded, still under 16 KiB
MAX_STATUS_MESSAGE_BYTES = 4096


def keepalive_options(keepalive_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """Channel (or server) options for a ping every keepalive_s and its answer within half that."""
    if keepalive_s < MIN_KEEPALIVE_S:
        raise ValueError(f"keepalive must be at least {MIN_KEEPALIVE_S:g} s, got {keepalive_s:g}")
    interval_ms, timeout_ms = int(keepalive_s * 1000), int(keepalive_s * 500)
    return [
        ("grpc.keepalive_time_ms", interval_ms),
        ("grpc.keepalive_timeout_ms", timeout_ms),
        # gRPC core drops the connection on the ping timeout (1 min by default), not on
        # keepalive_timeout_ms (grpc/grpc#39239): set both
        ("grpc.http2.ping_timeout_ms", timeout_ms),
        # keep pinging while the peer sends nothing: that silence is what is being checked
        ("grpc.http2.max_pings_without_data", 0),
    ]


def client_options(keepalive_s: float = KEEPALIVE_S) -> list[tuple[str, int]]:
    """A client channel's options: keepalive pings, and reconnect attempts at least once a second."""
    return [*keepalive_options(keepalive_s), ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]


def server_options() -> list[tuple[str, int]]:
    """Accept clients' keepalive pings down to MIN_KEEPALIVE_S apart (the default, 5 minutes, answers a
    client that pings every 10 s on a quiet stream with GOAWAY too_many_pings), ping clients, and own
    the port alone."""
    return [
        *keepalive_options(SERVER_KEEPALIVE_S),
        # half: a client's timer fires a little early at times, and one early ping is a strike
        ("grpc.http2.min_ping_interval_without_data_ms", int(MIN_KEEPALIVE_S * 500)),
        # gRPC binds with SO_REUSEPORT by default: a second server on a taken port would come up
        # sharing it, answering a random share of the calls meant for the first. Fail the bind instead.
        ("grpc.so_reuseport", 0),
    ]


class ServiceError(Exception):
    """An error the caller can act on: carries the gRPC status code and a message saying what to fix."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    @classmethod
    def invalid(cls, message: str) -> ServiceError:
        return cls(grpc.StatusCode.INVALID_ARGUMENT, message)

    @classmethod
    def not_found(cls, message: str) -> ServiceError:
        return cls(grpc.StatusCode.NOT_FOUND, message)

    @classmethod
    def unavailable(cls, message: str) -> ServiceError:
        return cls(grpc.StatusCode.UNAVAILABLE, message)

    @classmethod
    def resource_exhausted(cls, message: str) -> ServiceError:
        return cls(grpc.StatusCode.RESOURCE_EXHAUSTED, message)

    @classmethod
    def from_rpc_error(cls, error: grpc.aio.AioRpcError) -> ServiceError:
        return cls(error.code(), error.details() or error.code().name)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Turns ServiceError raised anywhere in a handler into its status; other exceptions become INTERNAL
    with the exception text, never a bare 'Unexpected error'."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


async def _abort(context: grpc.aio.ServicerContext, error: Exception) -> None:
    if isinstance(error, ServiceError):
        await context.abort(error.code, _fitted(error.message))
    if isinstance(error, NotImplementedError):  # a generated servicer's default (health's List, say)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, str(error) or "method not implemented")
    log.error("a handler failed", exc_info=error)  # a bug: keep its traceback
    await context.abort(grpc.StatusCode.INTERNAL, _fitted(f"{type(error).__name__}: {error}"))


def quoted(value: str) -> str:
    """A caller's value as an error message quotes it: repr(), a long one cut to its start and length,
    so the message keeps the advice after it, which _fitted's cut of the whole message would lose."""
    return repr(value) if len(value) <= 140 else f"{value[:40]!r}... ({len(value)} characters)"


def _fitted(message: str) -> str:
    """The message cut to MAX_STATUS_MESSAGE_BYTES. It travels percent-encoded in a trailer, and one
    past the client's 16 KiB of metadata (a 20,000-character name quoted whole) reached the client as
    RESOURCE_EXHAUSTED about the metadata instead of the error."""
    encoded = message.encode()
    if len(encoded) <= MAX_STATUS_MESSAGE_BYTES:
        return message
    kept = encoded[:MAX_STATUS_MESSAGE_BYTES].decode(errors="ignore")
    return f"{kept}... ({len(message) - len(kept)} more characters)"


def _wrap_unary(behaviour):
    async def wrapper(request, context):
        try:
            return await behaviour(request, context)
        except grpc.aio.AbortError:  # the handler set its status itself
            raise
        except Exception as error:
            await _abort(context, error)

    return wrapper


def _wrap_stream(behaviour):
    if not inspect.isasyncgenfunction(behaviour):  # it writes with context.write(): health's Watch
        return _wrap_unary(behaviour)

    async def wrapper(request, context):
        try:
            async for response in behaviour(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await _abort(context, error)

    return wrapper


def create_server(
    address: str, service_names: Iterable[str]
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Create (not start) an aio server bound to address with health and reflection registered.

    Returns the server, the bound port (address may end in ':0') and the health servicer, which the
    caller flips to SERVING once its own services are registered and ready.
    """
    server = grpc.aio.server(interceptors=[ErrorInterceptor()], options=server_options())
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:  # grpc's "Failed to bind", e.g. the port is taken
        raise OSError(f"could not bind {address}: is another server listening on it? ({error})") from error
    if port == 0:
        raise OSError(f"could not bind {address}")
    return server, port, health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    """Mark the server ("") and each named service SERVING."""
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)


async def set_not_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str]) -> None:
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM: servers wait on it, then drain."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def run_server(main: Coroutine[Any, Any, T]) -> T:
    """Run a server process's main coroutine on uvloop where it is installed (everywhere but Windows),
    else on asyncio's own loop. Each gRPC message costs a few loop callbacks, which libuv's loop runs
    for less: through the router, 0.1-0.4 ms less added latency per stream (`loraplex bench router`)."""
    if server_event_loop() == "asyncio":
        return asyncio.run(main)
    import uvloop

    return uvloop.run(main)


def server_event_loop() -> str:
    """The event loop run_server uses here, for benchmark reports."""
    return "asyncio" if importlib.util.find_spec("uvloop") is None else "uvloop"
