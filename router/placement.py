"""Which shards should serve an adapter, best first. Pure: same snapshot in, same ranking out, so
every router process agrees and the scale simulator can run this code.

Ranking: shards already holding the adapter (GPU > CPU > disk) first, then the rest in the
adapter's rendezvous-hash order (its "home" is the first of those). Bounded loads and hot-adapter
replication build on this in the router issue.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence

from loraplex.registry.records import TIERS, ShardRecord


def ring_score(adapter: str, shard_id: str) -> int:
    """Rendezvous (highest random weight) score: stable across processes and Python versions."""
    digest = hashlib.blake2b(f"{adapter}\0{shard_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank_shards(
    adapter: str, shards: Sequence[ShardRecord], excluded: Collection[str] = ()
) -> list[ShardRecord]:
    """Live shards for adapter ("" = base model), best first, leaving out the excluded ids."""
    candidates = [shard for shard in shards if shard.shard_id not in excluded]

    def key(shard: ShardRecord) -> tuple[int, int]:
        tier = shard.tier_of(adapter) if adapter else None
        tier_rank = TIERS.index(tier) if tier else len(TIERS)
        return tier_rank, -ring_score(adapter, shard.shard_id)

    return sorted(candidates, key=key)
