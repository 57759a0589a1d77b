"""A router's Prometheus metrics: requests and latency by adapter (bounded labels), placement
decisions by reason, failovers, and what its registry snapshot holds (read at scrape time)."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.protos.metrics import LATENCY_BUCKETS, AdapterLabels
from loraplex.router.snapshot import SnapshotKeeper

UNKNOWN_LABEL = "unknown"


class RouterMetrics:
    def __init__(self, snapshots: SnapshotKeeper, adapter_labels: AdapterLabels) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = adapter_labels
        self.requests = Counter(
            "loraplex_router_requests",
            "generations routed, by adapter and gRPC status (OK, NOT_FOUND, CANCELLED, ...)",
            ["adapter", "code"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "loraplex_router_time_to_first_token_seconds",
            "request arrival at the router to the first chunk it forwards",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "loraplex_router_request_seconds",
            "request arrival at the router to the end of its stream",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.decisions = Counter(
            "loraplex_router_decisions",
            "placement decisions by reason: affinity (a holder), home (its ring home), spill or "
            "replicate (past a saturated holder), base, overloaded (all at the bound), none (no shard)",
            ["reason"],
            registry=self.registry,
        )
        self.failovers = Counter(
            "loraplex_router_failovers",
            "requests retried on another shard after one failed before its first token",
            registry=self.registry,
        )
        self.registry.register(_SnapshotCollector(snapshots))

    def request(self, adapter: str, registered: bool) -> RequestTimer:
        """Only registered adapters take label values: unknown names (typos, probes) share one."""
        return RequestTimer(self, self.adapter_label(adapter) if registered else UNKNOWN_LABEL)


class RequestTimer:
    def __init__(self, metrics: RouterMetrics, label: str) -> None:
        self._metrics = metrics
        self._label = label
        self._started = time.perf_counter()
        self._first = False

    def chunk(self) -> None:
        if not self._first:
            self._first = True
            self._metrics.ttft.labels(self._label).observe(time.perf_counter() - self._started)

    def done(self, code: str) -> None:
        self._metrics.requests.labels(self._label, code).inc()
        if code == "OK":
            self._metrics.duration.labels(self._label).observe(time.perf_counter() - self._started)


class _SnapshotCollector(Collector):
    def __init__(self, snapshots: SnapshotKeeper) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator:
        snapshot = self._snapshots.current
        yield GaugeMetricFamily(
            "loraplex_router_live_shards", "shards in the router's snapshot", len(snapshot.shards)
        )
        yield GaugeMetricFamily(
            "loraplex_router_snapshot_age_seconds",
            "age of the registry snapshot routing uses (grows while Redis is unreachable)",
            max(0.0, time.time() - snapshot.taken_at),
        )
        yield GaugeMetricFamily(
            "loraplex_router_catalogue_adapters", "adapters in the router's snapshot", len(snapshot.adapters)
        )
        yield GaugeMetricFamily(
            "loraplex_router_inflight_requests",
            "requests this router has sent to shards that have not ended yet",
            self._snapshots.inflight.num_inflight,
        )
