"""Placement against the router's saturation test and adapter versions: a saturated shard (the queue
that RESOURCE_EXHAUSTED refuses to grow) is chosen only when every shard is, and a shard holding only
another version of the adapter is no better a holder than its tier says once the version is asked."""

from loraplex.registry.records import HeldAdapter, ShardRecord
from loraplex.router.placement import place


def _shard(
    shard_id: str,
    running: int = 0,
    waiting: int = 0,
    queued_tokens: int = 0,
    held: tuple[HeldAdapter, ...] = (),
    max_running: int = 8,
) -> ShardRecord:
    return ShardRecord(
        shard_id=shard_id,
        address="127.0.0.1:1",
        base_model="m",
        max_running_requests=max_running,
        running_requests=running,
        waiting_requests=waiting,
        queued_tokens=queued_tokens,
        adapters=held,
    )


def _ids(shards: tuple[ShardRecord, ...]) -> list[str]:
    return [shard.shard_id for shard in shards]


def _saturated_holder_and_a_shard_with_room() -> tuple[ShardRecord, ...]:
    # s0 holds "a" and has a full batch of 8 decoding and 8 short prompts waiting: 16 outstanding, twice
    # its batch, saturated by the router's test. s1 runs 6 long prompts still to prefill and has 2 free
    # batch slots, but its queued tokens weigh more in the blended load, so s0 is within the bound.
    return (
        _shard("s0", running=8, waiting=8, queued_tokens=800, held=(HeldAdapter("a", 1, "gpu"),)),
        _shard("s1", running=6, queued_tokens=12_000),
    )


def test_a_saturated_holder_within_the_bound_is_not_chosen_over_a_shard_with_room():
    placement = place("a", _saturated_holder_and_a_shard_with_room())
    assert _ids(placement.shards) == ["s1", "s0"], "the saturated holder only as a last resort"
    assert placement.reason == "replicate"


def test_the_saturation_factor_is_the_routers():
    placement = place("a", _saturated_holder_and_a_shard_with_room(), saturation_factor=3.0)
    assert (_ids(placement.shards), placement.reason) == (["s0", "s1"], "affinity")


def test_a_saturated_home_spills_and_a_saturated_least_loaded_shard_is_not_first_for_the_base_model():
    shards = _saturated_holder_and_a_shard_with_room()
    bare = tuple(_shard(s.shard_id, s.running_requests, s.waiting_requests, s.queued_tokens) for s in shards)
    for adapter in ("b", "c", "d", "e"):  # whichever is home, the saturated s0 comes last
        assert _ids(place(adapter, bare).shards) == ["s1", "s0"]
    placement = place("", bare)
    assert (_ids(placement.shards), placement.reason) == (["s1", "s0"], "base")


def test_this_routers_own_calls_can_saturate_a_shard():
    shards = (
        _shard("s0", running=8, waiting=7, queued_tokens=750, held=(HeldAdapter("a", 1, "gpu"),)),
        _shard("s1", running=6, queued_tokens=12_000),
    )
    assert place("a", shards).shard.shard_id == "s0"  # 15 outstanding: not yet saturated
    assert place("a", shards, inflight={"s0": 1}).shard.shard_id == "s1"


def test_when_every_shard_is_saturated_all_are_still_ranked():
    shards = (
        _shard("s0", running=8, waiting=8, held=(HeldAdapter("a", 1, "gpu"),)),
        _shard("s1", running=8, waiting=9),
        _shard("s2", running=8, waiting=10),
    )
    placement = place("a", shards)
    assert placement.reason == "overloaded"
    assert placement.shard.shard_id == "s0" and sorted(_ids(placement.shards)) == ["s0", "s1", "s2"]


def test_a_holder_of_the_version_asked_for_comes_before_holders_of_an_older_one():
    # s0 is idle but holds version 1 only; s1 holds the current version 2 and runs one request.
    shards = (
        _shard("s0", held=(HeldAdapter("a", 1, "gpu"),)),
        _shard("s1", running=1, held=(HeldAdapter("a", 2, "gpu"),)),
        _shard("s2", running=1, held=(HeldAdapter("a", 2, "disk"),)),
        _shard("s3"),
    )
    placement = place("a", shards, version=2)
    assert _ids(placement.shards)[:3] == ["s1", "s2", "s0"], "version 2 (gpu, disk), then version 1"
    assert placement.reason == "affinity"
    assert _ids(place("a", shards, version=1).shards)[0] == "s0"
    assert _ids(place("a", shards).shards)[:3] == ["s0", "s1", "s2"], "no version: any version held"


def test_a_holder_of_only_another_version_still_comes_before_the_ring_walk():
    # After an update a holder of the old version loads the new one in the background.
    shards = (*(_shard(f"s{i}") for i in range(6)), _shard("s6", held=(HeldAdapter("a", 1, "cpu"),)))
    placement = place("a", shards, version=2)
    assert (placement.shard.shard_id, placement.reason) == ("s6", "affinity")


def test_a_shard_holding_two_versions_ranks_by_the_tier_of_the_one_asked_for():
    shards = (
        _shard("s0", held=(HeldAdapter("a", 1, "gpu"), HeldAdapter("a", 2, "disk"))),
        _shard("s1", running=1, held=(HeldAdapter("a", 2, "cpu"),)),
    )
    assert _ids(place("a", shards, version=2).shards) == ["s1", "s0"]
    assert _ids(place("a", shards, version=1).shards) == ["s0", "s1"]


def test_a_new_snapshot_of_the_same_shards_sees_a_version_change():
    before = (
        _shard("s0", held=(HeldAdapter("a", 1, "gpu"),)),
        _shard("s1", held=(HeldAdapter("a", 2, "cpu"),)),
    )
    assert place("a", before, version=2).shard.shard_id == "s1"
    after = (_shard("s0", held=(HeldAdapter("a", 2, "gpu"),)), before[1])  # s0 loaded version 2
    assert place("a", after, version=2).shard.shard_id == "s0"
    dropped = (_shard("s0"), before[1])
    assert _ids(place("a", dropped, version=2).shards)[0] == "s1"
    assert place("a", before, version=2).shard.shard_id == "s1"
