"""The gateway process: a FastAPI app over one gRPC channel to the router, served by uvicorn."""

from __future__ import annotations

import logging
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.protos.telemetry import configure_tracing
from loraplex.registry.adapter_source import base_model_names
from loraplex.router.gateway import jobs_api, openai_api, tgi_api
from loraplex.router.gateway.backend import RouterClient
from loraplex.router.gateway.convert import ModelNames
from loraplex.router.gateway.errors import install_error_handlers
from loraplex.router.gateway.metrics import GatewayMetrics, MetricsMiddleware, tracked

log = logging.getLogger("loraplex.gateway")


@dataclass(frozen=True)
class GatewayConfig:
    router: str
    model: str  # the base model as the mesh was started with it: an id or a directory
    host: str = "127.0.0.1"
    port: int = 8080
    request_timeout_s: float = 600.0
    drain_timeout_s: float = 10.0

    def model_names(self) -> ModelNames:
        """The router calls the base by its last path part; the full id or path also means it, and so do
        the aliases no adapter may take (adapter_source.BASE_MODEL_ALIASES)."""
        return ModelNames(base=Path(self.model).name, aliases=base_model_names(self.model))


# FastAPI's own OpenTelemetry support makes each API request's span (honouring a `traceparent` header)
# and keeps it current while the route runs, so backend.py hands it on to the router. It records only
# once configure_tracing has installed a provider; metrics stay Prometheus; health probes go untraced.
TELEMETRY: TelemetryConfig = {
    "tracing": True,
    "operation_spans": False,
    "metrics": False,
    "logs": False,
    "auto_configure": False,
    "exclude": lambda scope: not tracked(scope.get("path", "")),
}


class RequestIdMiddleware:
    """Every answer carries `x-request-id`, the caller's own or a fresh one, as OpenAI's API does: the
    OpenAI SDK reads it as a response's `_request_id` and puts it in its logs."""

    MAX_LENGTH = 128

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get("x-request-id", "")
        request_id = given if 0 < len(given) <= self.MAX_LENGTH else uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("x-request-id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


def create_app(config: GatewayConfig) -> FastAPI:
    client = RouterClient(config.router, config.request_timeout_s)
    names = config.model_names()
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        client.open()
        print(f"gateway ready on http://{config.host}:{config.port} (router {config.router})", flush=True)
        yield
        await client.close()

    app = FastAPI(
        title="loraplex gateway",
        lifespan=lifespan,
        docs_url="/docs",
        redoc_url=None,
        telemetry=TELEMETRY,
    )
    install_error_handlers(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    app.include_router(openai_api.build_router(client, names))
    app.include_router(jobs_api.build_router(client, names))
    app.include_router(tgi_api.build_router(client, names))

    @app.get("/health")
    async def health() -> JSONResponse:
        """200 while the router answers its health check as SERVING; 503 otherwise."""
        if await client.serving():
            return JSONResponse({"status": "ok", "router": config.router})
        return JSONResponse(
            {"status": "unavailable", "router": config.router, "error": "the router is not serving"},
            status_code=503,
        )

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(config: GatewayConfig, log_level: str = "info") -> None:
    """Run until SIGINT/SIGTERM; uvicorn then stops accepting and lets open requests finish."""
    configure_tracing("loraplex-gateway")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config),
            host=config.host,
            port=config.port,
            loop="uvloop",
            http="httptools",
            log_level=log_level.lower(),
            access_log=False,
            timeout_graceful_shutdown=int(config.drain_timeout_s),
        )
    )
    server.run()
