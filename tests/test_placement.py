from loraplex.registry.records import HeldAdapter, ShardRecord
from loraplex.router.placement import rank_shards


def _shards(*held: tuple[str, str]) -> list[ShardRecord]:
    shards = [
        ShardRecord(shard_id=f"s{i}", address=f"127.0.0.1:{6000 + i}", base_model="m") for i in range(5)
    ]
    for shard_id, tier in held:
        index = int(shard_id[1:])
        shards[index] = ShardRecord(
            shard_id=shard_id,
            address=shards[index].address,
            base_model="m",
            adapters=(HeldAdapter(name="a", version=1, tier=tier),),
        )
    return shards


def test_ranking_is_deterministic_and_independent_of_input_order():
    shards = _shards()
    first = [s.shard_id for s in rank_shards("adapter-x", shards)]
    assert first == [s.shard_id for s in rank_shards("adapter-x", list(reversed(shards)))]
    assert sorted(first) == [s.shard_id for s in shards]


def test_different_adapters_get_different_homes():
    homes = {rank_shards(f"adapter-{i}", _shards())[0].shard_id for i in range(50)}
    assert len(homes) == 5


def test_holders_come_first_gpu_before_cpu_before_disk():
    ranked = [s.shard_id for s in rank_shards("a", _shards(("s3", "disk"), ("s1", "gpu"), ("s4", "cpu")))]
    assert ranked[:3] == ["s1", "s4", "s3"]


def test_excluded_shards_are_left_out():
    ranked = rank_shards("a", _shards(("s1", "gpu")), excluded={"s1", "s2"})
    assert {s.shard_id for s in ranked} == {"s0", "s3", "s4"}
