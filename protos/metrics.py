"""Prometheus plumbing the gRPC servers share: a small HTTP port for /metrics, and adapter labels
with bounded cardinality (a mesh may serve thousands of adapters; a time series per adapter per
metric per shard would swamp Prometheus)."""

from __future__ import annotations

import logging
import threading

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


def serve_metrics(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> int:
    """Serve GET /metrics on a daemon thread; returns the bound port (0 = off, returns 0)."""
    if not port:
        return 0
    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as error:
        raise OSError(
            error.errno,
            f"cannot serve metrics on {host}:{port}: {error.strerror}; pick a free "
            "--metrics-port, or 0 to turn metrics off",
        ) from error
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
