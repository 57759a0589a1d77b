"""`loraplex simulate placement`: the production placement code on thousands of simulated shards.

Each simulated shard has GPU and CPU adapter slots (LRU; a GPU eviction falls back to CPU, a CPU one to
disk, which is unlimited) and runs up to max_running_requests at once, queueing the rest. A request is a
GPU hit when its adapter is in the shard's GPU tier on arrival; otherwise the adapter is loaded (from CPU
or disk, which lengthens the request) and evicts the least recently used one. Shards report ShardRecords
as a heartbeat would; the router places on a snapshot refreshed every `refresh_ticks`, corrected by its
own in-flight counts (InflightTracker), exactly as router/placement.py expects. One router; a tick is
100 ms.

Policies, all on the same arrivals: bounded_load (router.placement.place), consistent_hash (the same
ring, home only: no bound, no holder preference), round_robin, least_loaded (on the same snapshot and
corrections) and random. Adapter popularity is Zipf(alpha) over num_adapters; arrivals are Poisson.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path

import numpy as np

from loraplex.registry.records import HeldAdapter, ShardRecord
from loraplex.router.placement import InflightTracker, key_point, place, ring_for
from loraplex.tools.simulate_placement_report import DEFINITIONS, check_targets, summary_table, write_report


@dataclass(frozen=True)
class SimConfig:
    num_shards: int = 1000
    num_adapters: int = 100_000
    alphas: tuple[float, ...] = (0.6, 1.0, 1.2)
    policies: tuple[str, ...] = ("bounded_load", "consistent_hash", "round_robin", "least_loaded", "random")
    # H100 80 GB with an 8B bf16 base (16 GB): a rank-16 adapter on every linear layer of Llama-3-8B is
    # 84 MB (42M parameters), so 96 slots take 8 GB and leave the KV cache ~50 GB; 256 CPU slots take
    # 21 GB of host memory. With 64 slots LRU tops out near 0.93 at alpha = 1: see gpu_slots_sensitivity.
    gpu_slots: int = 96
    cpu_slots: int = 256
    max_running_requests: int = 64
    utilisation: float = 0.5  # offered load: mean outstanding requests per shard / max_running_requests
    mean_service_ticks: int = 20  # 2 s a request; each takes uniformly 1/2 to 3/2 of this
    # Warm-up long enough that most misses left are capacity misses, not an adapter's first request.
    warmup_ticks: int = 800
    measure_ticks: int = 200
    refresh_ticks: int = 10  # the router's snapshot is 1 s old at most (router/server.py refreshes 1/s)
    cpu_load_ticks: int = 1
    disk_load_ticks: int = 5
    capacity_factor: float = 1.25
    churn_fraction: float = 0.01
    churn_alpha: float = 1.0  # the targets' alpha; the churn run: bounded_load, shards removed then added
    gpu_slots_sensitivity: tuple[int, ...] = (64,)  # bounded_load at churn_alpha with these GPU slots too
    seed: int = 0
    workers: int = 2

    def __post_init__(self) -> None:
        if self.measure_ticks < 2 or self.refresh_ticks < 1:
            raise ValueError(
                "measure_ticks must be >= 2 (the churn run removes shards when measuring starts and adds "
                f"others halfway) and refresh_ticks >= 1, not {self.measure_ticks} and {self.refresh_ticks}"
            )


@dataclass(frozen=True)
class _Workload:
    counts: np.ndarray  # [ticks] arrivals per tick
    adapters: np.ndarray  # [requests] popularity rank of each request's adapter, 0 = most popular
    services: np.ndarray  # [requests] service ticks, before any adapter load


def _workload(config: SimConfig, alpha: float) -> _Workload:
    """The same arrivals for every policy at one alpha: seeded by (seed, alpha) only."""
    rng = np.random.default_rng([config.seed, round(alpha * 1000)])
    ticks = config.warmup_ticks + config.measure_ticks
    rate = config.utilisation * config.max_running_requests * config.num_shards / config.mean_service_ticks
    counts = rng.poisson(rate, size=ticks)
    cdf = np.cumsum(np.arange(1, config.num_adapters + 1, dtype=np.float64) ** -alpha)
    adapters = np.searchsorted(cdf / cdf[-1], rng.random(int(counts.sum())), side="right")
    half = config.mean_service_ticks // 2
    services = rng.integers(half, config.mean_service_ticks + half + 1, size=adapters.size)
    return _Workload(counts, np.minimum(adapters, config.num_adapters - 1), services)


def adapter_name(rank: int) -> str:
    return f"adapter-{rank:06d}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


class _SimShard:
    """GPU and CPU LRU slots over an unlimited disk, and a run queue; reports like a real heartbeat."""

    def __init__(self, shard_id: str, config: SimConfig) -> None:
        self.shard_id = shard_id
        self.config = config
        self.gpu: OrderedDict[str, None] = OrderedDict()
        self.cpu: OrderedDict[str, None] = OrderedDict()
        self.disk: dict[str, None] = {}  # a dict, not a set: iteration order must not vary by process
        self.running = 0
        self.waiting: deque[int] = deque()  # service ticks of queued requests
        self.active = True
        self._held: tuple[HeldAdapter, ...] = ()
        self._held_changed = False

    def load_adapter(self, adapter: str) -> int:
        """Make adapter GPU-resident; the ticks that took (0: it already was, a GPU hit)."""
        if adapter in self.gpu:
            self.gpu.move_to_end(adapter)
            return 0
        self._held_changed = True
        if adapter in self.cpu:
            del self.cpu[adapter]
            ticks = self.config.cpu_load_ticks
        else:
            self.disk.pop(adapter, None)
            ticks = self.config.disk_load_ticks
        self.gpu[adapter] = None
        if len(self.gpu) > self.config.gpu_slots:
            self.cpu[self.gpu.popitem(last=False)[0]] = None
            if len(self.cpu) > self.config.cpu_slots:
                self.disk[self.cpu.popitem(last=False)[0]] = None
        return ticks

    def record(self, held: dict[tuple[str, str], HeldAdapter], with_adapters: bool) -> ShardRecord:
        """The heartbeat: load and held adapters (only for policies that read them: listing every
        adapter every refresh is most of a baseline's time); the adapters tuple is kept while unchanged."""
        if with_adapters and self._held_changed:
            self._held = tuple(
                held.get(key) or held.setdefault(key, HeldAdapter(key[0], 1, key[1]))
                for tier, names in (("gpu", self.gpu), ("cpu", self.cpu), ("disk", self.disk))
                for key in ((name, tier) for name in names)
            )
            self._held_changed = False
        return ShardRecord(
            shard_id=self.shard_id,
            address=f"sim://{self.shard_id}",
            base_model="sim",
            max_running_requests=self.config.max_running_requests,
            running_requests=self.running,
            waiting_requests=len(self.waiting),
            adapters=self._held,
        )


class _Policy:
    """Picks a shard for each request from the router's snapshot; told of this router's starts and ends."""

    reads_adapters = False  # whether it looks at the adapters the shards report

    def __init__(self, config: SimConfig, tracker: InflightTracker) -> None:
        self.config = config
        self.tracker = tracker
        self.snapshot: tuple[ShardRecord, ...] = ()
        self.index: dict[str, int] = {}  # shard id -> simulator index
        self.active: list[int] = []
        self.reasons: dict[str, int] = {}

    def refresh(self, snapshot: tuple[ShardRecord, ...], index: dict[str, int]) -> None:
        self.snapshot, self.index = snapshot, index
        self.active = [index[record.shard_id] for record in snapshot]

    def started(self, shard: int) -> None:
        pass

    def finished(self, shard: int) -> None:
        pass

    def choose(self, adapter: str) -> int:
        raise NotImplementedError


class _BoundedLoad(_Policy):
    """The production placement: router.placement.place."""

    reads_adapters = True

    def choose(self, adapter: str) -> int:
        placement = place(
            adapter,
            self.snapshot,
            inflight=self.tracker.corrections,
            capacity_factor=self.config.capacity_factor,
            limit=1,
        )
        self.reasons[placement.reason] = self.reasons.get(placement.reason, 0) + 1
        return self.index[placement.shards[0].shard_id]


class _ConsistentHash(_Policy):
    """The production ring's home for each adapter: no load bound, no preference for holders."""

    def refresh(self, snapshot: tuple[ShardRecord, ...], index: dict[str, int]) -> None:
        super().refresh(snapshot, index)
        self._ring = ring_for(frozenset(record.shard_id for record in snapshot))

    def choose(self, adapter: str) -> int:
        return self.index[self._ring.home(adapter)]


class _RoundRobin(_Policy):
    _next = 0

    def choose(self, adapter: str) -> int:
        self._next += 1
        return self.active[self._next % len(self.active)]


class _Random(_Policy):
    def __init__(self, config: SimConfig, tracker: InflightTracker) -> None:
        super().__init__(config, tracker)
        self._rng = np.random.default_rng([config.seed, 1])

    def choose(self, adapter: str) -> int:
        return self.active[int(self._rng.integers(len(self.active)))]


class _LeastLoaded(_Policy):
    """Fewest outstanding requests by the snapshot plus this router's corrections, as bounded_load sees."""

    def refresh(self, snapshot: tuple[ShardRecord, ...], index: dict[str, int]) -> None:
        super().refresh(snapshot, index)
        self._loads = np.full(max(index.values()) + 1, np.inf)
        self._loads[self.active] = [record.running_requests + record.waiting_requests for record in snapshot]

    def started(self, shard: int) -> None:
        self._loads[shard] += 1

    def finished(self, shard: int) -> None:
        self._loads[shard] -= 1

    def choose(self, adapter: str) -> int:
        return int(np.argmin(self._loads))


POLICIES = {
    "bounded_load": _BoundedLoad,
    "consistent_hash": _ConsistentHash,
    "round_robin": _RoundRobin,
    "least_loaded": _LeastLoaded,
    "random": _Random,
}


def churn_shards(config: SimConfig) -> tuple[list[str], list[str]]:
    """Which shards leave (at random) and which join (new ids) in the churn run and the moves count."""
    count = max(1, round(config.churn_fraction * config.num_shards))
    rng = np.random.default_rng([config.seed, 2])
    removed = sorted(shard_name(int(i)) for i in rng.choice(config.num_shards, count, replace=False))
    added = [shard_name(config.num_shards + i) for i in range(count)]
    return removed, added


class _Cluster:
    """The simulated shards and one router: its policy, in-flight tracker and snapshot refreshes."""

    def __init__(self, config: SimConfig, policy_name: str, horizon: int) -> None:
        self.config = config
        self.shards = [_SimShard(shard_name(i), config) for i in range(config.num_shards)]
        self.index = {shard.shard_id: i for i, shard in enumerate(self.shards)}
        self.tracker = InflightTracker()
        self.policy = POLICIES[policy_name](config, self.tracker)
        self._held: dict[tuple[str, str], HeldAdapter] = {}  # shared HeldAdapter records, as a cache
        self._ending: list[list[int]] = [[] for _ in range(horizon)]  # tick -> shards a request ends on

    def finish_due(self, t: int) -> None:
        """Requests ending at tick t leave their shard, which starts the next one queued."""
        for i in self._ending[t]:
            shard = self.shards[i]
            if not shard.active:
                continue  # its shard left: the request failed with it
            self.tracker.finished(shard.shard_id)
            self.policy.finished(i)
            if shard.waiting:
                self._ending[t + shard.waiting.popleft()].append(i)
            else:
                shard.running -= 1

    def remove(self, shard_ids: list[str]) -> None:
        for shard_id in shard_ids:
            self.shards[self.index[shard_id]].active = False

    def add(self, shard_ids: list[str]) -> None:
        self.index = dict(self.index)  # the policy keeps the one it was given
        for shard_id in shard_ids:
            self.index[shard_id] = len(self.shards)
            self.shards.append(_SimShard(shard_id, self.config))

    def refresh(self) -> None:
        """The router adopts a snapshot of every live shard's heartbeat."""
        reads_adapters = self.policy.reads_adapters
        self.tracker.snapshot_taken()
        snapshot = tuple(shard.record(self._held, reads_adapters) for shard in self.shards if shard.active)
        self.policy.refresh(snapshot, self.index)

    def route(self, t: int, adapter: str, service: int) -> tuple[int, bool]:
        """Place one request and start or queue it; the shard's index and whether it was a GPU hit."""
        i = self.policy.choose(adapter)
        shard = self.shards[i]
        load_ticks = shard.load_adapter(adapter)
        self.tracker.started(shard.shard_id)
        self.policy.started(i)
        if shard.running < self.config.max_running_requests:
            shard.running += 1
            self._ending[t + service + load_ticks].append(i)
        else:
            shard.waiting.append(service + load_ticks)
        return i, load_ticks == 0

    def imbalance(self) -> float:
        outstanding = [shard.running + len(shard.waiting) for shard in self.shards if shard.active]
        return max(outstanding) * len(outstanding) / max(sum(outstanding), 1)


def simulate(config: SimConfig, alpha: float, policy_name: str, churn: bool = False) -> dict:
    """One policy on one alpha's arrivals; with churn, shards leave when measuring starts and others
    join halfway through it."""
    wall = time.perf_counter()
    workload = _workload(config, alpha)
    ticks, warmup = config.warmup_ticks + config.measure_ticks, config.warmup_ticks
    cluster = _Cluster(config, policy_name, ticks + 2 * config.mean_service_ticks + config.disk_load_ticks)
    removed, added = churn_shards(config) if churn else ([], [])
    events = {warmup: "remove", warmup + config.measure_ticks // 2: "add"} if churn else {}
    names = [adapter_name(rank) for rank in range(config.num_adapters)]
    adapters, services = workload.adapters.tolist(), workload.services.tolist()
    hits = [0] * ticks
    served = [0] * (config.num_shards + len(added))
    ratios: list[float] = []
    first_request = [0, *np.cumsum(workload.counts).tolist()]  # tick t's requests: [first[t], first[t + 1])
    for t in range(ticks):
        cluster.finish_due(t)
        event = events.get(t)
        if event == "remove":
            cluster.remove(removed)
        elif event == "add":
            cluster.add(added)
        if event or t % config.refresh_ticks == 0:
            cluster.refresh()
        for request in range(first_request[t], first_request[t + 1]):
            i, hit = cluster.route(t, names[adapters[request]], services[request])
            hits[t] += hit
            served[i] += t >= warmup
        if t >= warmup:
            ratios.append(cluster.imbalance())
    shards = [shard for shard in cluster.shards if shard.active]
    result = _summary(config, workload, hits, ratios, [served[cluster.index[s.shard_id]] for s in shards])
    result["reasons"] = {reason: n / len(adapters) for reason, n in sorted(cluster.policy.reasons.items())}
    result["gpu_copies_of_top_adapter"] = sum(names[0] in shard.gpu for shard in shards)
    result["distinct_adapters_in_gpu"] = len({name for shard in shards for name in shard.gpu})
    if churn:
        result["churn"] = _churn_windows(config, workload, hits, sorted(events), removed, added)
    result["wall_s"] = round(time.perf_counter() - wall, 1)
    return result


def _summary(config: SimConfig, workload: _Workload, hits: list[int], ratios: list[float], served: list[int]):
    warmup, window = config.warmup_ticks, config.refresh_ticks
    counts = workload.counts.tolist()
    timeline = [
        round(sum(hits[t : t + window]) / max(sum(counts[t : t + window]), 1), 4)
        for t in range(0, len(counts), window)
    ]
    return {
        "gpu_hit_rate": round(sum(hits[warmup:]) / max(sum(counts[warmup:]), 1), 4),
        "load_imbalance": round(float(np.mean(ratios)), 4),
        "load_imbalance_p99": round(float(np.percentile(ratios, 99)), 4),
        "served_imbalance": round(max(served) * len(served) / max(sum(served), 1), 4),
        "num_requests_measured": sum(counts[warmup:]),
        "hit_rate_timeline": timeline,  # one value per refresh_ticks window, from tick 0
    }


def _churn_windows(
    config: SimConfig, workload: _Workload, hits: list[int], event_ticks: list[int], removed, added
) -> dict:
    """Hit rate just before shards leave, its lowest window after each event, and at the end."""
    window, counts = config.refresh_ticks, workload.counts.tolist()

    def rate(start: int, stop: int) -> float:
        start = max(start, 0)  # a window reaching back past tick 0 (a short warm-up) starts there
        return round(sum(hits[start:stop]) / max(sum(counts[start:stop]), 1), 4)

    removal, addition = event_ticks
    ticks = len(counts)
    return {
        "removed": removed,
        "added": added,
        "remove_at_tick": removal,
        "add_at_tick": addition,
        "hit_rate_before": rate(removal - 5 * window, removal),
        "lowest_after_remove": min(rate(t, t + window) for t in range(removal, addition, window)),
        "lowest_after_add": min(rate(t, t + window) for t in range(addition, ticks, window)),
        "hit_rate_last_window": rate(ticks - 5 * window, ticks),
    }


def home_moves(config: SimConfig) -> dict:
    """Fraction of adapter homes that move when churn_fraction of the shards leave or join, on the
    production ring, beside hashing modulo the shard count for reference."""
    ids = [shard_name(i) for i in range(config.num_shards)]
    removed, added = churn_shards(config)
    names = [adapter_name(rank) for rank in range(config.num_adapters)]
    rings = {
        "before": ring_for(frozenset(ids)),
        "remove": ring_for(frozenset(ids) - set(removed)),
        "add": ring_for(frozenset(ids + added)),
    }
    homes = {key: [ring.home(name) for name in names] for key, ring in rings.items()}
    points = np.array([key_point(name) for name in names], dtype=np.uint64)
    before = points % np.uint64(len(ids))

    def moved(after: list[str]) -> float:
        return round(sum(a != b for a, b in zip(homes["before"], after, strict=True)) / len(names), 5)

    return {
        "shards_changed": len(removed),
        "ring": {"remove": moved(homes["remove"]), "add": moved(homes["add"])},
        "hash_mod_n": {
            "remove": round(float(np.mean(before != points % np.uint64(len(ids) - len(removed)))), 5),
            "add": round(float(np.mean(before != points % np.uint64(len(ids) + len(added)))), 5),
        },
    }


def _job(args: tuple[tuple, SimConfig, float, str, bool]) -> tuple[tuple, dict]:
    key, config, alpha, policy, churn = args
    return key, simulate(config, alpha, policy, churn)


def run_simulation(config: SimConfig) -> dict:
    """Every policy at every alpha, the churn run and the home moves; the report as a dict."""
    started, wall = datetime.now().astimezone(), time.perf_counter()
    jobs = [
        (("results", str(float(alpha)), policy), config, alpha, policy, False)
        for policy in config.policies
        for alpha in config.alphas
    ]
    if "bounded_load" in config.policies:  # the slowest first, so that both workers finish together
        jobs[:0] = [(("churn",), config, config.churn_alpha, "bounded_load", True)] + [
            (
                ("gpu_slots", str(slots)),
                replace(config, gpu_slots=slots),
                config.churn_alpha,
                "bounded_load",
                False,
            )
            for slots in config.gpu_slots_sensitivity
        ]
    if config.workers > 1:
        with ProcessPoolExecutor(max_workers=config.workers) as pool:
            outputs = list(pool.map(_job, jobs))
    else:
        outputs = [_job(job) for job in jobs]
    results: dict[str, dict[str, dict]] = {str(float(alpha)): {} for alpha in config.alphas}
    by_slots: dict[str, dict] = {}
    churn_run = None
    for key, result in outputs:
        if key[0] == "churn":
            churn_run = result
        elif key[0] == "gpu_slots":
            by_slots[key[1]] = result
        else:
            results[key[1]][key[2]] = result
    moves = home_moves(config)
    return {
        "benchmark": "placement",
        "date": started.date().isoformat(),
        "started_at": started.isoformat(timespec="seconds"),
        "wall_s": round(time.perf_counter() - wall, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "workers": config.workers,
        },
        "config": asdict(config),
        "definitions": DEFINITIONS,
        "results": results,
        "churn": {"home_moves": moves, "run": churn_run},
        "gpu_slots_sensitivity": {"alpha": config.churn_alpha, "policy": "bounded_load", "runs": by_slots},
        "targets": check_targets(config.churn_alpha, results, moves),
    }


def _policy_names(value: str) -> tuple[str, ...]:
    """--policies: comma-separated names, each one of POLICIES."""
    policies = tuple(p for p in value.split(",") if p)
    unknown = set(policies) - set(POLICIES)
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown policies {sorted(unknown)}; choose from {', '.join(POLICIES)}"
        )
    return policies


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulator's flags, for main here and for the `loraplex` command; defaults are SimConfig's."""
    defaults = SimConfig()
    parser.add_argument("--shards", type=int, default=defaults.num_shards)
    parser.add_argument("--adapters", type=int, default=defaults.num_adapters)
    parser.add_argument(
        "--alphas", default=",".join(str(a) for a in defaults.alphas), help="Zipf exponents, comma-separated"
    )
    parser.add_argument(
        "--policies",
        type=_policy_names,
        default=",".join(defaults.policies),
        help=f"from {', '.join(POLICIES)}",
    )
    parser.add_argument("--gpu-slots", type=int, default=defaults.gpu_slots)
    parser.add_argument("--cpu-slots", type=int, default=defaults.cpu_slots)
    parser.add_argument("--max-running-requests", type=int, default=defaults.max_running_requests)
    parser.add_argument("--utilisation", type=float, default=defaults.utilisation)
    parser.add_argument("--warmup-ticks", type=int, default=defaults.warmup_ticks)
    parser.add_argument("--measure-ticks", type=int, default=defaults.measure_ticks)
    parser.add_argument("--refresh-ticks", type=int, default=defaults.refresh_ticks)
    parser.add_argument("--capacity-factor", type=float, default=defaults.capacity_factor)
    parser.add_argument(
        "--gpu-slots-sensitivity",
        default=",".join(str(n) for n in defaults.gpu_slots_sensitivity),
        help="GPU slot counts to rerun bounded_load with at alpha 1.0, comma-separated ('' for none)",
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--output-dir", type=Path, default=Path("bench/results"))


def _config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        num_shards=args.shards,
        num_adapters=args.adapters,
        alphas=tuple(float(a) for a in args.alphas.split(",") if a),
        policies=args.policies,
        gpu_slots=args.gpu_slots,
        cpu_slots=args.cpu_slots,
        max_running_requests=args.max_running_requests,
        utilisation=args.utilisation,
        warmup_ticks=args.warmup_ticks,
        measure_ticks=args.measure_ticks,
        refresh_ticks=args.refresh_ticks,
        capacity_factor=args.capacity_factor,
        gpu_slots_sensitivity=tuple(int(n) for n in args.gpu_slots_sensitivity.split(",") if n),
        seed=args.seed,
        workers=args.workers,
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Run with add_arguments' flags, write the report, print its table and where it went; the exit code."""
    report = run_simulation(_config_from_args(args))
    json_path, png_path = write_report(report, args.output_dir)
    print(summary_table(report))
    print(f"wrote {json_path} and {png_path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="simulate_placement", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
