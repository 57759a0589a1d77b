"""Which shards should serve a request, best first: consistent hashing with bounded loads.

Pure and deterministic: the same snapshot (and in-flight counts) in, the same ranking out, so every
router process agrees and the scale simulator (tools/simulate_placement.py) runs this very code.

- Ring: each shard sits at VNODES points of a blake2b hash ring (stable across processes); an adapter's
  *home* is the first shard clockwise from the adapter's point, so adding or removing one of n shards
  moves about 1/n of the homes.
- Bounded loads (Mirrokni, Thorup and Zadimoghaddam, 2018): a shard may take a request only if its load
  with it stays within max(c x m, m + 1, 2), m being its share of the mean load with the request
  (capacity-weighted by max_running_requests); c = 1.25 by default. The paper's ceil(c x m) lets rounding
  loosen c by up to 1/m (41 for a mean of 32, not 40); m + 1 keeps some shard always eligible, even with
  fractional loads; the 2 (IDLE_LOAD) keeps affinity at low traffic.
- Load, in requests: outstanding requests and queued tokens, blended as (requests + queued_tokens / tau) / 2,
  tau being the snapshot's mean queued tokens per outstanding request (no tokens reported: just
  requests); plus this router's requests the reports do not count yet (InflightTracker). A shard that
  reports at most IDLE_LOAD outstanding requests, and has no more with the corrections, is within the
  bound whatever its blended load: the blend can weigh one request still to prefill at 1.36 requests,
  over the bound of 1 when two of three shards hold one request each. (A shard reporting more is
  judged by its blended load, even when this router has seen some of them end: the blend is what
  says how heavy the rest are.)
- Ranking: holders under the bound (GPU > CPU > disk, then less loaded, then a per-adapter hash order),
  then the ring walk from the home skipping shards over the bound, then, as a last resort so failover
  has somewhere to go, the shards over the bound in that same order, and last the saturated ones. When
  every holder of a hot adapter is at the bound the request goes to the next shard of the adapter's
  ring, which loads it: a replica.
- Versions: given the version a request needs, a shard holding only other versions of the adapter ranks
  after every holder of that version, whatever the tiers: it must load the version like any shard
  (after an update it does so in the background, so it still comes before the ring walk).
- Saturated: a shard with saturation_factor x its batch (max_running_requests) outstanding, corrections
  included, is where the router's RESOURCE_EXHAUSTED test (router/generation.py) finds a queue that only
  grows. It is never within the bound, so it is chosen only when every other shard is saturated too,
  whatever its blended load (which queued tokens can keep under the bound).
- The base model ("") needs no affinity: shards rank least loaded first.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import time
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import chain
from types import MappingProxyType
from typing import Literal

from loraplex.registry.records import TIERS, ShardRecord

DEFAULT_CAPACITY_FACTOR = 1.25
DEFAULT_SATURATION_FACTOR = 2.0  # the router's --saturation-factor: outstanding requests per batch slot
# A shard with at most this many outstanding requests (or this much load) is never over the bound: one
# more request batches with it at almost no cost, while sending the adapter elsewhere costs a load.
# Without it, at low traffic a heartbeat that still counts one finished request would move adapters
# from shard to shard, and two routers (whose corrections differ) would disagree on where.
IDLE_LOAD = 1.0
VNODES = 160  # points per shard: each shard's share of homes is within about +-8% of 1/n
Reason = Literal["affinity", "home", "spill", "replicate", "base", "overloaded", "none"]
_TIER_RANK = {tier: rank for rank, tier in enumerate(TIERS)}
_STALE = len(TIERS) + 1  # holder ranks: TIERS, any other tier, then only other versions than the one asked
Tiers = tuple[list[int], ...]  # shard indexes by holder rank
_SLACK = 1e-9  # float tolerance on the bound


def _hash64(text: str, domain: bytes) -> int:
    digest = hashlib.blake2b(text.encode(), digest_size=8, person=domain).digest()
    return int.from_bytes(digest, "big")


@lru_cache(maxsize=1 << 16)
def key_point(key: str) -> int:
    """Where an adapter (or any routing key) sits on the ring; cached, as popular adapters recur."""
    return _hash64(key, b"loraplex-key")


class HashRing:
    """Consistent-hash ring over shard ids; independent of their order. Build once per shard set."""

    def __init__(self, shard_ids: Collection[str], vnodes: int = VNODES) -> None:
        self.shard_ids = tuple(sorted(set(shard_ids)))
        points = sorted(
            (_hash64(f"{shard_id}\0{v}", b"loraplex-vnode"), index)
            for index, shard_id in enumerate(self.shard_ids)
            for v in range(vnodes)
        )
        self._points = [point for point, _ in points]
        self._owners = [owner for _, owner in points]

    def walk(self, key: str) -> Iterator[int]:
        """Indexes into shard_ids, each once, clockwise from key's point: its home first. Lazy."""
        start = bisect.bisect_left(self._points, key_point(key))
        seen = bytearray(len(self.shard_ids))
        remaining = len(self.shard_ids)
        owners = self._owners
        for step in chain(range(start, len(owners)), range(start)):
            owner = owners[step]
            if not seen[owner]:
                seen[owner] = 1
                yield owner
                remaining -= 1
                if not remaining:
                    return

    def home(self, key: str) -> str | None:
        if not self._points:
            return None
        start = bisect.bisect_left(self._points, key_point(key))
        return self.shard_ids[self._owners[start % len(self._owners)]]


@lru_cache(maxsize=8)
def ring_for(shard_ids: frozenset[str]) -> HashRing:
    """The ring for a shard set, cached: routers see the same set for many requests."""
    return HashRing(shard_ids)


@dataclass(frozen=True)
class Placement:
    """One request's ranking and why its first shard was chosen (metrics count decisions by reason)."""

    shards: tuple[ShardRecord, ...]
    reason: Reason

    @property
    def shard(self) -> ShardRecord | None:
        return self.shards[0] if self.shards else None


class InflightTracker:
    """This router's requests that the shards' latest reports do not reflect, per shard.

    A report counts what its shard had at its time: the heartbeat's `reported_at` in the snapshot, or
    the outstanding count a shard sends back as one of this router's calls to it ends (`reported`),
    whichever is newer. Since then this router may have sent it more (not counted yet: +1 each) and
    seen some counted ones end (-1 each); a call-end report also moves the shard's load from what the
    snapshot says to what it sent. Call started and finished as requests go out and end, reported
    after finished, and snapshot_taken with each new snapshot's shards; pass `corrections` to place()
    as `inflight`. Shards with no report time are taken to be exact at the snapshot.
    """

    _KEEP_ENDED_S = 10.0  # reports older than this are not expected (heartbeat TTLs are seconds)

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._delta: dict[str, int] = {}
        self.corrections: Mapping[str, int] = MappingProxyType(self._delta)
        self._live: dict[str, list[float]] = {}  # shard -> start times of this router's calls, oldest first
        self._ended: dict[str, deque[tuple[float, float]]] = {}  # shard -> (started, ended), by end time
        self._snapshot: dict[str, tuple[float, int]] = {}  # shard -> (report time, requests) it reported
        self._fresh: dict[str, tuple[float, int]] = {}  # shard -> (time, requests) from a call's end
        self.num_inflight = 0  # this router's calls to shards, started and not yet finished

    def started(self, shard_id: str) -> float:
        """Returns the call's start time, to give back to finished."""
        now = self._clock()
        self._live.setdefault(shard_id, []).append(now)
        self.num_inflight += 1
        self._delta[shard_id] = self._delta.get(shard_id, 0) + 1
        return now

    def finished(self, shard_id: str, started_at: float | None = None) -> None:
        live = self._live.get(shard_id, [])
        if live:  # without started_at, take the oldest call to be the one that ended
            live.remove(started_at if started_at in live else live[0])
            self.num_inflight -= 1
            ended = self._ended.setdefault(shard_id, deque())
            ended.append((started_at if started_at is not None else 0.0, self._clock()))
        self._delta[shard_id] = self._delta.get(shard_id, 0) - 1

    def reported(self, shard_id: str, outstanding_requests: int) -> None:
        """The shard's outstanding requests, sent back as a call of this router to it ended (after
        finished for that call): newer than any heartbeat, so the shard's correction restarts here."""
        now = self._clock()
        self._fresh[shard_id] = (now, outstanding_requests)
        ended = self._ended.get(shard_id)
        while ended and ended[0][1] <= now:  # ended before this report: it never counts them
            ended.popleft()
        self._recompute(shard_id)

    def snapshot_taken(self, shards: Sequence[ShardRecord] = ()) -> None:
        now = self._clock()
        for ended in self._ended.values():
            while ended and ended[0][1] < now - self._KEEP_ENDED_S:
                ended.popleft()
        self._snapshot = {
            shard.shard_id: (
                shard.reported_at if shard.reported_at > 0 else now,
                shard.running_requests + shard.waiting_requests,
            )
            for shard in shards
        }
        self._fresh = {
            shard_id: fresh
            for shard_id, fresh in self._fresh.items()
            if shard_id in self._snapshot and fresh[0] > self._snapshot[shard_id][0]
        }
        self._delta.clear()
        for shard_id in self._snapshot:
            self._recompute(shard_id)

    def _recompute(self, shard_id: str) -> None:
        """The shard's correction from its newest report: what that report says beyond the snapshot's,
        plus calls it cannot have seen, less those it counted that have ended since."""
        if shard_id not in self._snapshot:
            self._delta.pop(shard_id, None)  # not in the snapshot: not routable, nothing to correct
            return
        since, snapshot_requests = self._snapshot[shard_id]
        offset = 0
        fresh = self._fresh.get(shard_id)
        if fresh is not None and fresh[0] > since:
            since, offset = fresh[0], fresh[1] - snapshot_requests
        unseen = sum(1 for started in self._live.get(shard_id, ()) if started > since)
        ended = sum(1 for started, end in self._ended.get(shard_id, ()) if started <= since < end)
        delta = offset + unseen - ended
        if delta:
            self._delta[shard_id] = delta
        else:
            self._delta.pop(shard_id, None)


class _Table:
    """A snapshot prepared once for many placements: ring order, holders by adapter, reported loads.

    Built from the previous table where the shard list is the same: only shards whose adapters tuple
    is a new object are re-read, so a refresh costs what changed, not every adapter of every shard.
    """

    def __init__(self, shards: Sequence[ShardRecord], previous: _Table | None = None) -> None:
        self.shards = tuple(shards)
        self.ids = [shard.shard_id for shard in self.shards]
        self.position = {shard_id: index for index, shard_id in enumerate(self.ids)}
        self.ring = ring_for(frozenset(self.ids))
        self.from_ring = [self.position[shard_id] for shard_id in self.ring.shard_ids]
        self.weights = [max(1, shard.max_running_requests) for shard in self.shards]
        self.distinct_weights = set(self.weights)
        self.requests = [shard.running_requests + shard.waiting_requests for shard in self.shards]
        self.idle = [count <= IDLE_LOAD for count in self.requests]  # as reported (the floor's first half)
        self.loads = _reported_loads(self.shards, self.requests)
        self.total_load = sum(self.loads)
        self.total_weight = sum(self.weights)
        self.tie = [_hash64(shard_id, b"loraplex-tie") for shard_id in self.ids]
        self.held: list[dict[tuple[str, int], int]] = []  # per shard: (adapter, version) -> best tier rank
        # adapter -> version -> shard indexes by tier rank: GPU, CPU, disk, any other
        self.holders: dict[str, dict[int, Tiers]] = {}
        if previous is not None and previous.ids == self.ids:
            self._update_holders(previous)
        else:
            self.held = [_best_tiers(shard) for shard in self.shards]
            for index, held in enumerate(self.held):
                for (name, version), rank in held.items():
                    versions = self.holders.setdefault(name, {})
                    if version not in versions:
                        versions[version] = tuple([] for _ in range(len(TIERS) + 1))
                    versions[version][rank].append(index)

    def _update_holders(self, previous: _Table) -> None:
        self.held = list(previous.held)
        self.holders = dict(previous.holders)  # entries are replaced, never edited: previous stays valid
        for index, (shard, before) in enumerate(zip(self.shards, previous.shards, strict=True)):
            if shard.adapters is before.adapters:
                continue
            old, new = previous.held[index], _best_tiers(shard)
            self.held[index] = new
            for key in old.keys() - new.keys():
                self._set_holder(key, index, None)
            for key, rank in new.items():
                if old.get(key) != rank:
                    self._set_holder(key, index, rank)

    def _set_holder(self, key: tuple[str, int], index: int, rank: int | None) -> None:
        name, version = key
        versions = dict(self.holders.get(name, {}))
        tiers = versions.get(version) or tuple([] for _ in range(len(TIERS) + 1))
        tiers = tuple(
            [i for i in held if i != index] + ([index] if r == rank else []) for r, held in enumerate(tiers)
        )
        if any(tiers):
            versions[version] = tiers
        else:
            versions.pop(version, None)
        if versions:
            self.holders[name] = versions
        else:
            self.holders.pop(name, None)

    def holder_tiers(self, name: str, version: int) -> Tiers | tuple[()]:
        """The shards holding name, by rank: tiers of the version asked for (0: any), then _STALE for
        the shards holding only other versions."""
        versions = self.holders.get(name)
        if not versions:
            return ()
        if len(versions) == 1 and (not version or version in versions):
            return next(iter(versions.values()))  # the common case: one version held
        best: dict[int, int] = {}
        for held_version, tiers in versions.items():
            for rank, indexes in enumerate(tiers):
                rank = rank if not version or held_version == version else _STALE
                for index in indexes:
                    best[index] = min(rank, best.get(index, _STALE))
        ranked: Tiers = tuple([] for _ in range(_STALE + 1))
        for index, rank in best.items():
            ranked[rank].append(index)
        return ranked


def _best_tiers(shard: ShardRecord) -> dict[tuple[str, int], int]:
    best: dict[tuple[str, int], int] = {}
    for held in shard.adapters:
        rank = _TIER_RANK.get(held.tier, len(TIERS))
        key = (held.name, held.version)
        if rank < best.get(key, len(TIERS) + 1):
            best[key] = rank
    return best


def _reported_loads(shards: Sequence[ShardRecord], requests: Sequence[int]) -> list[float]:
    tokens = sum(shard.queued_tokens for shard in shards)
    if not tokens or not sum(requests):
        return [float(count) for count in requests]
    tau = tokens / sum(requests)
    return [(count + shard.queued_tokens / tau) / 2 for count, shard in zip(requests, shards, strict=True)]


class _TableCache:
    """The last snapshot's table. Reused by identity only for tuples: a tuple of frozen records cannot
    change under us, while a list could be edited in place (a list gets a fresh table each call)."""

    def __init__(self) -> None:
        self._shards: tuple[ShardRecord, ...] | None = None
        self._table: _Table | None = None

    def get(self, shards: Sequence[ShardRecord]) -> _Table:
        if shards is self._shards and self._table is not None:
            return self._table
        self._table = _Table(shards, previous=self._table)
        self._shards = shards if isinstance(shards, tuple) else None
        return self._table


_tables = _TableCache()


def place(
    adapter: str,
    shards: Sequence[ShardRecord],
    excluded: Collection[str] = (),
    *,
    inflight: Mapping[str, int] | None = None,
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
    saturation_factor: float = DEFAULT_SATURATION_FACTOR,
    version: int = 0,
    limit: int | None = None,
) -> Placement:
    """Rank the live shards for adapter ("" = base model), leaving out the excluded ids.

    inflight: this router's requests per shard not yet in the snapshot (InflightTracker.corrections).
    saturation_factor: outstanding requests per batch slot at which a shard is saturated (ranked last).
    version: the adapter version the request needs (its catalogue record's); 0 takes any version held.
    limit: stop once this many shards are ranked (the simulator needs only the first); None ranks all.
    """
    table = _tables.get(shards)
    view = _LoadView(table, inflight or {}, excluded, capacity_factor, saturation_factor)
    if view.total_weight <= 0:
        return Placement((), "none")
    limit = len(table.shards) if limit is None else limit
    point = key_point(adapter)
    if not adapter:
        loads, ids, weights, get, tie = table.loads, table.ids, table.weights, view.get, table.tie
        keys = [
            ((loads[i] + get(ids[i], 0)) / weights[i], tie[i] ^ point, i)
            for i in range(len(ids))
            if i not in view.skip
        ]
        best = heapq.nsmallest(limit, keys)
        if any(view.saturated(key[2]) for key in best):  # saturated shards go last
            best = heapq.nsmallest(limit, keys, key=lambda key: (view.saturated(key[2]), key))
        return Placement(tuple(table.shards[i] for *_, i in best), "base")
    ranked, over, saturated, holders = _rank_holders(adapter, version, table, view, point, limit)
    affinity = bool(ranked)  # holders within the bound come first
    home = _walk_ring(adapter, table, view, holders, limit, ranked, over, saturated)
    over += saturated
    if not ranked and not over:
        return Placement((), "none")
    if not ranked:
        reason: Reason = "overloaded"
    elif affinity:
        reason = "affinity"
    elif holders:
        reason = "replicate"
    else:
        reason = "home" if ranked[0] == home else "spill"
    return Placement(tuple(table.shards[i] for i in (ranked + over)[:limit]), reason)


class _LoadView:
    """The snapshot's loads as one request sees them: corrected, without the excluded shards, and the
    most load each capacity (max_running_requests) may carry before taking the request."""

    def __init__(
        self,
        table: _Table,
        inflight: Mapping[str, int],
        excluded: Collection[str],
        capacity_factor: float,
        saturation_factor: float,
    ) -> None:
        self.get = inflight.get
        self.skip = {table.position[shard_id] for shard_id in excluded if shard_id in table.position}
        total_load = table.total_load + sum(inflight.values())
        self.total_weight = table.total_weight
        for index in self.skip:
            total_load -= table.loads[index] + self.get(table.ids[index], 0)
            self.total_weight -= table.weights[index]
        per_weight = (max(total_load, 0.0) + 1) / max(self.total_weight, 1)  # the mean, with this request
        self.caps = {  # the most load a shard of this capacity may carry and still take the request
            weight: max(capacity_factor * per_weight * weight - 1, per_weight * weight, IDLE_LOAD) + _SLACK
            for weight in table.distinct_weights
        }
        self.utilisation_caps = {weight: cap / weight for weight, cap in self.caps.items()}
        # outstanding requests (corrected) at which a shard of this capacity is saturated
        self.full = {weight: saturation_factor * weight for weight in table.distinct_weights}
        self._table = table

    def saturated(self, index: int) -> bool:
        """Whether the shard has saturation_factor x its batch outstanding, corrections included."""
        table = self._table
        return table.requests[index] + self.get(table.ids[index], 0) >= self.full[table.weights[index]]


def _rank_holders(
    adapter: str, version: int, table: _Table, view: _LoadView, point: int, limit: int
) -> tuple[list[int], list[int], list[int], set[int]]:
    """Holders within the bound, best first (tier, utilisation, hash), those over it and those saturated;
    then every holder, unless the ranking is already full (no ring walk follows, so the rest do not
    matter)."""
    loads, requests, idle, ids, weights, tie, caps, get, skip = (
        table.loads, table.requests, table.idle, table.ids, table.weights, table.tie,
        view.utilisation_caps, view.get, view.skip,
    )  # fmt: skip
    ranked: list[int] = []
    over: list[int] = []
    saturated: list[int] = []
    holders: set[int] = set()
    for tier in table.holder_tiers(adapter, version):
        # The hot path of a popular adapter with hundreds of replicas: comprehensions, no calls.
        keyed = [((loads[i] + get(ids[i], 0)) / weights[i], tie[i] ^ point, i) for i in tier if i not in skip]
        fit = [
            key
            for key in keyed
            if key[0] <= caps[weights[key[2]]]
            or (idle[key[2]] and requests[key[2]] + get(ids[key[2]], 0) <= IDLE_LOAD)
        ]
        best = heapq.nsmallest(limit - len(ranked), fit)
        if any(view.saturated(key[2]) for key in best):  # rare: saturated, yet within the bound
            fit = [key for key in fit if not view.saturated(key[2])]
            best = heapq.nsmallest(limit - len(ranked), fit)
        ranked += [key[2] for key in best]
        if len(ranked) >= limit:
            break
        holders.update(tier)
        if len(fit) < len(keyed):
            fitted = {key[2] for key in fit}
            for key in sorted(key for key in keyed if key[2] not in fitted):
                (saturated if view.saturated(key[2]) else over).append(key[2])
    return ranked, over, saturated, holders


def _walk_ring(
    adapter: str,
    table: _Table,
    view: _LoadView,
    holders: set[int],
    limit: int,
    ranked: list[int],
    over: list[int],
    saturated: list[int],
) -> int:
    """Extend ranked (within the bound), over and saturated from the ring walk until limit; the home's
    index."""
    loads, requests, idle, ids, weights, caps, full, get, skip = (
        table.loads, table.requests, table.idle, table.ids, table.weights, view.caps, view.full, view.get,
        view.skip,
    )  # fmt: skip
    home = -1
    if len(ranked) >= limit:
        return home
    for ring_index in table.ring.walk(adapter):
        i = table.from_ring[ring_index]
        if i in skip:
            continue
        if home < 0:
            home = i
        if i in holders:
            continue
        correction = get(ids[i], 0)
        if requests[i] + correction >= full[weights[i]]:
            saturated.append(i)
            continue
        within = loads[i] + correction <= caps[weights[i]] or (
            idle[i] and requests[i] + correction <= IDLE_LOAD
        )
        (ranked if within else over).append(i)
        if len(ranked) >= limit:
            break
    return home


def rank_shards(
    adapter: str,
    shards: Sequence[ShardRecord],
    excluded: Collection[str] = (),
    *,
    inflight: Mapping[str, int] | None = None,
    capacity_factor: float = DEFAULT_CAPACITY_FACTOR,
    saturation_factor: float = DEFAULT_SATURATION_FACTOR,
    version: int = 0,
) -> list[ShardRecord]:
    """Every live shard for adapter ("" = base model), best first, leaving out the excluded ids."""
    placement = place(
        adapter,
        shards,
        excluded,
        inflight=inflight,
        capacity_factor=capacity_factor,
        saturation_factor=saturation_factor,
        version=version,
    )
    return list(placement.shards)
