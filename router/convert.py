"""Registry records to protobuf messages (the router's edge), and a whole response from its stream."""

from __future__ import annotations

from collections.abc import AsyncIterable

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


async def collect_response(
    chunks: AsyncIterable[common_pb2.GenerateStreamResponse],
) -> common_pb2.GenerateResponse:
    """A whole GenerateResponse from a generation's chunks (the router's unary Generate, the gateway)."""
    response = common_pb2.GenerateResponse()
    texts = []
    async for chunk in chunks:
        texts.append(chunk.text)
        response.tokens.extend(chunk.tokens)
        response.prefill_tokens.extend(chunk.prefill_tokens)
        response.request_id = chunk.request_id
        if chunk.finish_reason:
            response.finish_reason = chunk.finish_reason
            response.stop_text = chunk.stop_text
            response.usage.CopyFrom(chunk.usage)
            response.served_by.CopyFrom(chunk.served_by)
    response.text = "".join(texts)
    return response
