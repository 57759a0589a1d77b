"""Prometheus plumbing the gRPC servers share: a small HTTP port for /metrics, and adapter labels
with bounded cardinality (a mesh may serve thousands of adapters; a time series per adapter per
metric per shard would swamp Prometheus)."""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger("loraplex.metrics")
DEFAULT_ADAPTER_LABELS = 32
BASE_LABEL = "base"
OTHER_LABEL = "other"
# request latency histograms (seconds): from a cached short answer to a long generation, up to the
# 600 s the gateway and the job worker give one by default (vLLM's e2e buckets reach 7680 s)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class AdapterLabels:
    """The first `limit` adapters seen get their own label value; later ones share "other". The base
    model is "base". Pick the limit to cover the adapters worth watching one by one (0: all "other")."""

    def __init__(self, limit: int = DEFAULT_ADAPTER_LABELS) -> None:
        self.limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, adapter: str) -> str:
        if not adapter:
            return BASE_LABEL
        if adapter in self._named:
            return adapter
        with self._lock:
            if len(self._named) < self.limit:
                self._named.add(adapter)
                return adapter
        return OTHER_LABEL


class MetricsServer:
    """A /metrics port served on a daemon thread (or none, when metrics are off); close() ends it, so a
    server stopped inside a longer-lived process (tests, benchmarks) frees its port."""

    def __init__(self, server: WSGIServer | None = None) -> None:
        self._server = server
        self.port = server.server_address[1] if server is not None else 0  # 0: metrics off

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> MetricsServer:
    """Serve GET /metrics on a daemon thread (port 0: off). A port taken is an OSError naming the flag."""
    if not port:
        return MetricsServer()
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot serve metrics on {host}:{port}: {error.strerror}; pick a free "
            "--metrics-port, or 0 to turn metrics off",
        ) from error
    log.info("metrics on http://%s:%d/metrics", host, server.server_address[1])
    return MetricsServer(server)
