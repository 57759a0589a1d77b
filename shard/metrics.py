"""A shard's Prometheus metrics. Request latencies are observed as requests run; the engine's queue,
KV cache and adapter tiers are read when Prometheus scrapes, so serving pays nothing for them."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from loraplex.protos.metrics import LATENCY_BUCKETS, AdapterLabels
from loraplex.shard.adapter_slots import LOAD_BUCKETS, TierCounters
from loraplex.shard.adapter_store import AdapterStore
from loraplex.shard.engine import Engine

TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56)


class ShardMetrics:
    def __init__(self, engine: Engine, adapters: AdapterStore, adapter_labels: AdapterLabels) -> None:
        self.registry = CollectorRegistry()
        self.adapter_label = adapter_labels
        self.requests = Counter(
            "loraplex_shard_requests",
            "generations finished, by adapter and outcome (ok, error, cancelled)",
            ["adapter", "outcome"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "loraplex_shard_time_to_first_token_seconds",
            "request arrival to its first generated token (queueing, adapter load and prefill)",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.per_token = Histogram(
            "loraplex_shard_time_per_output_token_seconds",
            "mean time between output tokens after the first, per request",
            ["adapter"],
            buckets=TOKEN_BUCKETS,
            registry=self.registry,
        )
        self.generation_tokens = Counter(
            "loraplex_shard_generation_tokens",
            "tokens generated and sent to callers, whatever the request's outcome",
            ["adapter"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "loraplex_shard_request_seconds",
            "request arrival to its last token",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.awaiting_adapter_load = Gauge(
            "loraplex_shard_adapter_load_waiting_requests",
            "calls waiting for their adapter to load, before they queue for admission (routers count "
            "them as load with waiting_requests)",
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine, adapters))

    def request(self, adapter: str) -> RequestTimer:
        return RequestTimer(self, self.adapter_label(adapter))


class RequestTimer:
    """Times one request: call `token()` per generated token and `done(outcome)` once."""

    def __init__(self, metrics: ShardMetrics, label: str) -> None:
        self._metrics = metrics
        self._label = label
        self._generated = metrics.generation_tokens.labels(label)
        self._started = time.perf_counter()
        self._first: float | None = None
        self._tokens = 0

    def token(self) -> None:
        self._tokens += 1
        self._generated.inc()
        if self._first is None:
            self._first = time.perf_counter()
            self._metrics.ttft.labels(self._label).observe(self._first - self._started)

    def done(self, outcome: str) -> None:
        now = time.perf_counter()
        metrics = self._metrics
        metrics.requests.labels(self._label, outcome).inc()
        if outcome != "ok":
            return
        metrics.duration.labels(self._label).observe(now - self._started)
        if self._first is not None and self._tokens > 1:
            metrics.per_token.labels(self._label).observe((now - self._first) / (self._tokens - 1))


class _EngineCollector(Collector):
    """Gauges and counters read from the engine and the adapter tiers at scrape time."""

    def __init__(self, engine: Engine, adapters: AdapterStore) -> None:
        self._engine = engine
        self._adapters = adapters

    def collect(self) -> Iterator:
        stats = self._engine.stats
        for name, value, help_text in (
            ("running_requests", stats.running_requests, "sequences in the running batch"),
            ("waiting_requests", stats.waiting_requests, "requests queued for admission"),
            ("queued_tokens", stats.queued_tokens, "prompt and output tokens not yet computed"),
            ("kv_blocks_used", stats.kv_blocks_used, "KV cache blocks held by sequences"),
            ("kv_blocks_free", stats.kv_blocks_free, "KV cache blocks free"),
        ):
            yield GaugeMetricFamily(f"loraplex_shard_{name}", help_text, value=value)
        for name, value, help_text in (
            ("preemptions", stats.num_preemptions, "sequences whose KV blocks were taken back, to recompute"),
            (
                "prefix_cache_hit_tokens",
                stats.num_prefix_hit_tokens,
                "prompt tokens whose KV came from the prefix cache",
            ),
        ):
            yield CounterMetricFamily(f"loraplex_shard_{name}", help_text, value=value)
        yield from self._rank_memory()
        disk = self._adapters.disk
        tiers: dict[str, tuple[int, TierCounters]] = {
            "gpu": (len(stats.adapters_in_slots), self._engine.slots.counters),
            "cpu": (len(self._adapters.held()), self._adapters.counters),
        }
        if disk is not None:
            tiers["disk"] = (len(disk.held()), disk.counters)
        held = GaugeMetricFamily("loraplex_adapters", "adapters held, by tier", labels=["tier"])
        hits = CounterMetricFamily(
            "loraplex_adapter_tier_hits", "requests whose adapter the tier held", labels=["tier"]
        )
        misses = CounterMetricFamily(
            "loraplex_adapter_tier_misses", "requests whose adapter the tier had to load", labels=["tier"]
        )
        evictions = CounterMetricFamily(
            "loraplex_adapter_tier_evictions", "adapters evicted from the tier", labels=["tier"]
        )
        loads = HistogramMetricFamily(
            "loraplex_adapter_load_seconds",
            "time to load an adapter into the tier (disk: from its source; cpu: disk to ready; gpu: to a slot)",
            labels=["tier"],
        )
        for tier, (count, counters) in tiers.items():
            held.add_metric([tier], count)
            hits.add_metric([tier], counters.hits)
            misses.add_metric([tier], counters.misses)
            evictions.add_metric([tier], counters.evictions)
            cumulative, buckets = 0, []
            for bound, bucket_count in zip(LOAD_BUCKETS, list(counters.load_bucket_counts), strict=True):
                cumulative += bucket_count
                buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
            loads.add_metric([tier], buckets, sum_value=counters.load_seconds_sum)
        yield from (held, hits, misses, evictions, loads)

    def _rank_memory(self) -> Iterator[GaugeMetricFamily]:
        """Bytes per tensor-parallel rank (one rank, 0, without tensor parallelism); fixed at start."""
        weights = GaugeMetricFamily(
            "loraplex_shard_rank_weight_bytes",
            "model weights held by each tensor-parallel rank",
            labels=["rank"],
        )
        kv_cache = GaugeMetricFamily(
            "loraplex_shard_rank_kv_cache_bytes",
            "KV cache allocated on each tensor-parallel rank",
            labels=["rank"],
        )
        for memory in self._engine.rank_memory:
            weights.add_metric([str(memory.rank)], memory.weight_bytes)
            kv_cache.add_metric([str(memory.rank)], memory.kv_cache_bytes)
        yield from (weights, kv_cache)
