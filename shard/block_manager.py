"""KV block allocation: which cache blocks each sequence owns. Pure bookkeeping, no tensors.

Full blocks are content-addressed by a hash chained over every token up to the block's end (salted with
the adapter, whose K/V differ from the base model's), so a sequence whose prompt starts like an
earlier one's shares those blocks instead of recomputing them: automatic prefix caching, as in vLLM.
A freed block keeps its contents and stays findable until it is handed out again, oldest freed first.

The hash is keyed with a secret drawn at start (128-bit BLAKE2b), not Python's `hash()`: that one is
the same in every process and cheap to invert step by step, so a client could craft a prompt whose
blocks collide with another tenant's (say, a common system prompt) and have later requests served
from K/V it chose (vLLM's advisory GHSA-rm76-4mrf-v9r8; vLLM now hashes with SHA-256).
"""

from __future__ import annotations

import hashlib
import secrets
from array import array
from collections import OrderedDict
from collections.abc import Sequence as Blocks

from loraplex.shard.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache budget holds no block; raise kv_cache_bytes")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # oldest first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, int] = {}  # block -> hash of its (full, computed) contents
        self._block_of: dict[int, int] = {}  # hash -> block
        self.num_prefix_hit_tokens = 0  # since start: prompt tokens served from cached blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks, for a sequence that holds none yet. The
        block with the last token is never taken: it must be computed to give the next token's logits."""
        if not self.enable_prefix_caching or seq.block_table or seq.wants_all_prompt_logits:
            return []
        blocks, chained = [], seq.cache_salt
        for index in range((seq.num_tokens - 1) // self.block_size):
            chained = _chain(chained, seq.token_ids, index, self.block_size)
            block = self._block_of.get(chained)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int, prefix: Blocks[int] = ()) -> int:
        """Free blocks seq would consume to hold num_new_tokens more tokens after `prefix`."""
        total = seq.num_computed_tokens + len(prefix) * self.block_size + num_new_tokens
        fresh = max(0, -(-total // self.block_size) - len(seq.block_table) - len(prefix))
        revived = sum(
            1 for block in prefix if self._refs[block] == 0
        )  # idle cached blocks leave the free list
        return fresh + revived

    def can_reserve(self, seq: Sequence, num_new_tokens: int, prefix: Blocks[int] = ()) -> bool:
        return self.blocks_needed(seq, num_new_tokens, prefix) <= len(self._free)

    def reserve(self, seq: Sequence, num_new_tokens: int, prefix: Blocks[int] = ()) -> None:
        """Give seq the `prefix` blocks (from cached_prefix) as computed, then room for num_new_tokens."""
        needed = self.blocks_needed(seq, num_new_tokens, prefix)
        if needed > len(self._free):
            raise RuntimeError(f"reserve() without can_reserve(): need {needed}, {len(self._free)} free")
        for block in prefix:
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(self._hash_of[block])
        seq.num_computed_tokens += len(prefix) * self.block_size
        self.num_prefix_hit_tokens += len(prefix) * self.block_size
        total = seq.num_computed_tokens + num_new_tokens
        while len(seq.block_table) * self.block_size < total:
            block = next(iter(self._free))
            self._forget(block)
            self._take(block)
            seq.block_table.append(block)

    def register_computed(self, seq: Sequence) -> None:
        """Make seq's newly completed full blocks findable by later sequences."""
        if not self.enable_prefix_caching:
            return
        chained = seq.block_hashes[-1] if seq.block_hashes else seq.cache_salt
        for index in range(len(seq.block_hashes), seq.num_computed_tokens // self.block_size):
            chained = _chain(chained, seq.token_ids, index, self.block_size)
            seq.block_hashes.append(chained)
            block = seq.block_table[index]
            if chained not in self._block_of:  # an identical block computed alongside stays private
                self._block_of[chained] = block
                self._hash_of[block] = chained

    def free(self, seq: Sequence) -> None:
        # The tail goes back first, so it is reused before the prefix that other prompts may share.
        for block in reversed(seq.block_table):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._free[block] = None
        seq.block_table.clear()
        seq.block_hashes.clear()

    def _take(self, block: int) -> None:
        if self._refs[block] == 0:
            del self._free[block]
        self._refs[block] += 1

    def _forget(self, block: int) -> None:
        chained = self._hash_of.pop(block, None)
        if chained is not None:
            del self._block_of[chained]


_HASH_KEY = secrets.token_bytes(32)  # per process: nobody outside it can aim a prompt at a hash


def _chain(previous: int, token_ids: list[int], index: int, block_size: int) -> int:
    """The block's hash: keyed over the previous block's hash (or the salt) and the block's tokens."""
    digest = hashlib.blake2b(previous.to_bytes(16, "little"), digest_size=16, key=_HASH_KEY)
    digest.update(array("I", token_ids[index * block_size : (index + 1) * block_size]).tobytes())
    return int.from_bytes(digest.digest(), "little")
