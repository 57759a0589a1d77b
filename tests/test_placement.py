from dataclasses import replace

from loraplex.registry.records import HeldAdapter, ShardRecord
from loraplex.router.placement import HashRing, InflightTracker, place, rank_shards


def _shards(*held: tuple[str, str], loads: dict[str, int] | None = None, count: int = 5) -> list[ShardRecord]:
    """count idle shards s0..; held puts adapter "a" on a shard in a tier; loads sets running requests.
    Each runs up to 64 requests at once, so none of these loads saturates a shard."""
    tiers = dict(held)
    loads = loads or {}
    return [
        ShardRecord(
            shard_id=f"s{i}",
            address=f"127.0.0.1:{6000 + i}",
            base_model="m",
            max_running_requests=64,
            running_requests=loads.get(f"s{i}", 0),
            adapters=(HeldAdapter(name="a", version=1, tier=tiers[f"s{i}"]),) if f"s{i}" in tiers else (),
        )
        for i in range(count)
    ]


def _ids(shards: list[ShardRecord]) -> list[str]:
    return [shard.shard_id for shard in shards]


def test_ranking_is_deterministic_and_independent_of_input_order():
    shards = _shards()
    first = _ids(rank_shards("adapter-x", shards))
    assert first == _ids(rank_shards("adapter-x", list(reversed(shards))))
    assert first == _ids(rank_shards("adapter-x", tuple(shards)))
    assert sorted(first) == _ids(shards)


def test_fresh_rings_agree_on_homes_and_order():
    ids = [f"shard-{i}" for i in range(50)]
    one, other = HashRing(ids), HashRing(list(reversed(ids)))
    for key in ("a", "b", "support-bot", ""):
        assert list(one.walk(key)) == list(other.walk(key))
        assert one.home(key) == other.home(key) == one.shard_ids[next(one.walk(key))]


def test_different_adapters_get_different_homes():
    homes = {rank_shards(f"adapter-{i}", _shards())[0].shard_id for i in range(50)}
    assert len(homes) == 5


def test_an_adapter_nobody_holds_goes_home():
    shards = _shards(count=20)
    home = HashRing(_ids(shards)).home("new-adapter")
    placement = place("new-adapter", shards)
    assert (placement.shard.shard_id, placement.reason) == (home, "home")


def test_holders_come_first_gpu_before_cpu_before_disk():
    shards = _shards(("s3", "disk"), ("s1", "gpu"), ("s4", "cpu"))
    assert _ids(rank_shards("a", shards))[:3] == ["s1", "s4", "s3"]
    assert place("a", shards).reason == "affinity"


def test_excluded_shards_are_left_out():
    ranked = rank_shards("a", _shards(("s1", "gpu")), excluded={"s1", "s2"})
    assert set(_ids(ranked)) == {"s0", "s3", "s4"}


def test_an_overloaded_holder_is_passed_over_and_the_adapter_replicated():
    # 10 shards, 30 requests running, all on the holder: mean with the new one is 3.1, bound 1.25 x 3.1.
    shards = _shards(("s1", "gpu"), loads={"s1": 30}, count=10)
    placement = place("a", shards)
    assert placement.reason == "replicate"
    assert placement.shard.shard_id != "s1"
    assert placement.shards[-1].shard_id == "s1"  # still there, last, for failover
    assert len(placement.shards) == 10


def test_a_busy_home_spills_to_the_next_shard_on_the_ring():
    ids = [f"s{i}" for i in range(10)]
    ring = HashRing(ids)
    home, after = (ids_in_order := [ring.shard_ids[i] for i in ring.walk("b")])[0], ids_in_order[1]
    shards = _shards(loads={home: 30}, count=10)
    placement = place("b", shards)
    assert (placement.shard.shard_id, placement.reason) == (after, "spill")


def test_the_bound_holds_for_every_first_choice():
    loads = {f"s{i}": 3 * i for i in range(8)}  # 0 .. 21
    shards = _shards(loads=loads, count=8)
    bound = 1.25 * (sum(loads.values()) + 1) / 8  # 1.25 x 10.6 = 13.3
    chosen = {place(f"adapter-{i}", shards).shard.running_requests for i in range(200)}
    assert max(chosen) + 1 <= bound and max(chosen) == 12  # s4 (12 running) may take one; s5 (15) not


def test_rounding_does_not_loosen_the_bound_at_load():
    # 41 shards near 32: the mean with one more is 32.2 and 1.25 x 32.2 = 40.2, so a holder may reach
    # 40 but not 41, which ceil(c x mean) = 41 would have allowed.
    loads = {f"s{i}": 32 for i in range(40)} | {"s7": 39, "s40": 31}
    shards = _shards(("s7", "gpu"), loads=loads, count=41)
    assert place("a", shards).reason == "affinity"  # 39 + 1 = 40
    assert place("a", _shards(("s7", "gpu"), loads={**loads, "s7": 40}, count=41)).reason == "replicate"


def test_one_stale_request_does_not_break_affinity_on_a_quiet_mesh():
    # Two shards, the holder's last report still counts the request it just served: the mean with one
    # more is 1, and max(1.25 x 1, 1 + 1) = 2 lets the holder take it.
    shards = _shards(("s1", "gpu"), loads={"s1": 1}, count=2)
    assert (place("a", shards).shard.shard_id, place("a", shards).reason) == ("s1", "affinity")


def test_a_higher_capacity_factor_keeps_more_on_the_holder():
    shards = _shards(("s1", "gpu"), loads={"s1": 5, "s2": 3}, count=4)  # mean with one: 2.25
    assert place("a", shards, capacity_factor=1.25).reason == "replicate"
    assert place("a", shards, capacity_factor=3.0).reason == "affinity"


def test_heterogeneous_capacity_weights_the_bound():
    # s1 can run 8 times as many requests: at 8 running it is less loaded than a small shard at 2.
    shards = [
        ShardRecord(
            shard_id=f"s{i}",
            address="x",
            base_model="m",
            max_running_requests=64 if i == 1 else 8,
            running_requests={1: 8}.get(i, 2),
            adapters=(HeldAdapter("a", 1, "gpu"),) if i == 1 else (),
        )
        for i in range(4)
    ]
    assert place("a", shards).reason == "affinity"


def test_queued_tokens_count_as_load():
    # Same request counts; s1's queue holds far more tokens, so it is the busier shard.
    shards = [
        ShardRecord(
            shard_id=f"s{i}",
            address="x",
            base_model="m",
            max_running_requests=8,
            running_requests=4,
            queued_tokens=40_000 if i == 1 else 1_000,
            adapters=(HeldAdapter("a", 1, "gpu"),) if i == 1 else (),
        )
        for i in range(4)
    ]
    assert place("a", shards).reason == "replicate"


def test_inflight_requests_not_yet_reported_change_the_choice():
    shards = _shards(("s1", "gpu"), loads={"s1": 2, "s0": 2, "s2": 2, "s3": 2}, count=4)
    assert place("a", shards).shard.shard_id == "s1"
    tracker = InflightTracker()
    for _ in range(3):
        tracker.started("s1")
    placement = place("a", shards, inflight=tracker.corrections)
    assert placement.shard.shard_id != "s1" and placement.reason == "replicate"
    tracker.snapshot_taken()  # the next snapshot's reports count those requests
    assert place("a", shards, inflight=tracker.corrections).shard.shard_id == "s1"


def test_finished_requests_lower_a_stale_report():
    shards = _shards(("s1", "gpu"), loads={"s1": 6, "s0": 2, "s2": 2, "s3": 2}, count=4)
    tracker = InflightTracker()
    assert place("a", shards, inflight=tracker.corrections).reason == "replicate"
    for _ in range(4):
        tracker.finished("s1")
    assert place("a", shards, inflight=tracker.corrections).reason == "affinity"


def test_base_model_requests_go_to_the_least_loaded_shard():
    shards = _shards(loads={"s0": 3, "s1": 1, "s2": 0, "s3": 2, "s4": 5})
    placement = place("", shards)
    assert placement.reason == "base"
    assert _ids(list(placement.shards)) == ["s2", "s1", "s3", "s0", "s4"]


def test_limit_ranks_only_the_first_shards():
    shards = _shards(("s2", "cpu"), count=10)
    full = _ids(rank_shards("a", shards))
    assert _ids(list(place("a", shards, limit=3).shards)) == full[:3]


def test_no_shards_gives_an_empty_ranking():
    assert rank_shards("a", []) == []
    placement = place("a", _shards(count=2), excluded={"s0", "s1"})
    assert (placement.shards, placement.reason) == ((), "none")


def test_a_new_snapshot_of_the_same_shards_sees_changed_holdings():
    before = tuple(_shards(("s1", "gpu"), count=6))
    assert place("a", before).shard.shard_id == "s1"
    after = tuple(_shards(("s4", "gpu"), count=6))
    assert place("a", after).shard.shard_id == "s4"
    assert place("a", before).shard.shard_id == "s1"


def _homes(ids: list[str], keys: list[str]) -> list[str]:
    ring = HashRing(ids)
    return [ring.home(key) for key in keys]


def test_adding_or_removing_one_of_100_shards_moves_about_1_percent_of_homes():
    ids = [f"shard-{i}" for i in range(100)]
    keys = [f"adapter-{i}" for i in range(20_000)]
    before = _homes(ids, keys)
    for changed in (ids[:37] + ids[38:], [*ids, "shard-new"]):
        after = _homes(changed, keys)
        moved = sum(a != b for a, b in zip(before, after, strict=True)) / len(keys)
        assert 0 < moved <= 0.02


def test_at_low_traffic_a_holder_with_one_request_keeps_its_adapter():
    """A heartbeat still counting one (perhaps finished) request must not move the adapter away: one
    more request batches with it for free, a spill would cost a load elsewhere (IDLE_LOAD)."""
    shards = _shards(("s1", "gpu"), loads={"s1": 1}, count=3)
    placement = place("a", shards)
    assert (placement.shard.shard_id, placement.reason) == ("s1", "affinity")
    busier = _shards(("s1", "gpu"), loads={"s1": 2}, count=3)
    assert place("a", busier).reason == "replicate"  # 3 with it against a mean of 1: over the bound


def test_one_request_in_prefill_does_not_push_a_holder_over_the_bound():
    """Queued tokens blend into load: the holder's one request still to prefill (6 tokens) against
    another shard's one nearly done (1 token) weighs 1.36 requests, over the bound (1, for a mean of 1).
    One outstanding request is never over the bound, and a router that knows the request has ended
    (a -1 correction) must choose as one that does not."""
    shards = _shards(("s1", "gpu"), loads={"s0": 1, "s1": 1}, count=3)
    shards = [replace(shard, queued_tokens={"s0": 1, "s1": 6}.get(shard.shard_id, 0)) for shard in shards]
    for inflight in ({}, {"s1": -1}):
        placement = place("a", shards, inflight=inflight)
        assert (placement.shard.shard_id, placement.reason) == ("s1", "affinity"), inflight
    # The bound in blended load still applies once a shard has more than one request.
    busier = [replace(shard, running_requests=2) if shard.shard_id == "s1" else shard for shard in shards]
    assert place("a", busier).reason == "replicate"


def test_corrections_follow_each_shards_report_time():
    """Reports taken at different times: a call is unseen by a report older than its start, and one
    that ended after a report that counted it is subtracted."""
    now = [100.0]
    tracker = InflightTracker(clock=lambda: now[0])
    early = tracker.started("s0")  # t=100
    now[0] = 101.0
    tracker.started("s0")  # t=101, still running
    now[0] = 102.0
    tracker.finished("s0", early)  # t=102
    reports = [
        ShardRecord("s0", "a:1", "m", running_requests=1, reported_at=100.5),  # counted `early` only
        ShardRecord("s1", "a:2", "m", reported_at=0.0),  # no report time: taken as exact
    ]
    tracker.snapshot_taken(reports)
    # s0: the call from t=101 is unseen (+1); `early` was counted at 100.5 and has ended since (-1).
    # Corrections of zero are left out.
    assert dict(tracker.corrections) == {}
    tracker.snapshot_taken([ShardRecord("s0", "a:1", "m", running_requests=2, reported_at=101.5)])
    assert dict(tracker.corrections) == {"s0": -1}  # counted both; `early` has ended since
    tracker.snapshot_taken([ShardRecord("s0", "a:1", "m", running_requests=2, reported_at=100.8)])
    assert dict(tracker.corrections) == {}  # +1 unseen, -1 ended since the report
    tracker.snapshot_taken([ShardRecord("s0", "a:1", "m", running_requests=0, reported_at=99.0)])
    assert dict(tracker.corrections) == {"s0": 1}  # both started after it; `early` ended, never counted


def test_a_report_sent_back_as_a_call_ends_outdates_the_heartbeat():
    """A shard's outstanding count in a call's trailing metadata is newer than its heartbeat: the
    correction restarts from it, until a snapshot brings a heartbeat newer still."""
    now = [100.0]
    tracker = InflightTracker(clock=lambda: now[0])
    tracker.snapshot_taken([ShardRecord("s0", "a:1", "m", running_requests=6, reported_at=100.0)])
    now[0] = 101.0
    call = tracker.started("s0")
    now[0] = 102.0
    tracker.finished("s0", call)
    tracker.reported("s0", 2)  # the heartbeat said 6; the shard now has 2
    assert dict(tracker.corrections) == {"s0": -4}
    now[0] = 103.0
    tracker.started("s0")
    assert dict(tracker.corrections) == {"s0": -3}
    # A heartbeat older than the call-end report changes the base, not the answer: 2 + 1 = 5 - 2.
    tracker.snapshot_taken([ShardRecord("s0", "a:1", "m", running_requests=5, reported_at=101.5)])
    assert dict(tracker.corrections) == {"s0": -2}
    # A newer heartbeat (which counts the call from t=103) replaces it.
    tracker.snapshot_taken([ShardRecord("s0", "a:1", "m", running_requests=3, reported_at=104.0)])
    assert dict(tracker.corrections) == {}
