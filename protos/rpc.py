"""gRPC plumbing every server shares: one error type mapped to status codes, and server creation
with health checking and reflection (so grpcurl works against any component)."""

from __future__ import annotations

import asyncio
import importlib.util
import signal
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

T = TypeVar("T")


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
        await context.abort(error.code, error.message)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


def _wrap_unary(behaviour):
    async def wrapper(request, context):
        try:
            return await behaviour(request, context)
        except (ServiceError, ValueError, RuntimeError, KeyError, OSError) as error:
            await _abort(context, error)

    return wrapper


def _wrap_stream(behaviour):
    async def wrapper(request, context):
        try:
            async for response in behaviour(request, context):
                yield response
        except (ServiceError, ValueError, RuntimeError, KeyError, OSError) as error:
            await _abort(context, error)

    return wrapper


def create_server(
    address: str, service_names: Iterable[str]
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Create (not start) an aio server bound to address with health and reflection registered.

    Returns the server, the bound port (address may end in ':0') and the health servicer, which the
    caller flips to SERVING once its own services are registered and ready.
    """
    server = grpc.aio.server(interceptors=[ErrorInterceptor()])
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    port = server.add_insecure_port(address)
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
