"""Registry records to protobuf messages (the router's edge)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from loraplex.protos.v1 import common_pb2
from loraplex.registry.records import TIERS, AdapterRecord, ShardRecord

TIER_TO_PB = dict(zip(TIERS, (common_pb2.TIER_GPU, common_pb2.TIER_CPU, common_pb2.TIER_DISK), strict=True))


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def adapter_to_pb(record: AdapterRecord, shards: tuple[ShardRecord, ...] = ()) -> common_pb2.Adapter:
    """The catalogue record, with the placements the given shards report for it."""
    return common_pb2.Adapter(
        name=record.name,
        base_model=record.base_model,
        source=record.source,
        version=record.version,
        rank=record.rank,
        alpha=record.alpha,
        target_modules=list(record.target_modules),
        checksum=record.checksum,
        created_at=_timestamp(record.created_at),
        updated_at=_timestamp(record.updated_at),
        placements=[
            common_pb2.AdapterPlacement(
                shard=shard.shard_id, tier=TIER_TO_PB[held.tier], version=held.version
            )
            for shard in shards
            for held in shard.adapters
            if held.name == record.name
        ],
    )
