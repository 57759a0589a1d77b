"""The gateway's Prometheus metrics: requests by route and status, latency to the first byte of the
answer and to its end. Labels are routes, never adapter names, so cardinality stays fixed."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# up to the 600 s the gateway gives a request by default (--request-timeout)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TRACKED_PREFIXES = ("/v1/", "/generate")
KNOWN_ROUTES = frozenset(
    {"/", "/generate", "/generate_stream", "/v1/completions", "/v1/chat/completions", "/v1/models"}
    | {"/v1/async/completions"}
)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "loraplex_gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "loraplex_gateway_time_to_first_byte_seconds",
            "request start to the response's first body byte (for streams: the first token)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "loraplex_gateway_request_seconds",
            "request start to the end of the response",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streamed responses pass through untouched."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not tracked(path):
            await self.app(scope, receive, send)
            return
        route = _route_label(path)
        started = time.perf_counter()
        status = 500
        first_body = True

        async def timed_send(message: Message) -> None:
            nonlocal status, first_body
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and first_body and message.get("body"):
                first_body = False
                self.metrics.first_byte.labels(route).observe(time.perf_counter() - started)
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.duration.labels(route).observe(time.perf_counter() - started)


def tracked(path: str) -> bool:
    """The API's routes (not /health, /metrics or /docs): what is counted and traced."""
    return path == "/" or path.startswith(TRACKED_PREFIXES)


def _route_label(path: str) -> str:
    """Fixed labels: job ids and model ids in paths are folded away."""
    if path.startswith("/v1/async/jobs/"):
        return "/v1/async/jobs/{id}"
    if path.startswith("/v1/models/"):
        return "/v1/models/{id}"
    return path if path in KNOWN_ROUTES else "other"
