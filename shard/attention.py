"""Attention over the paged KV cache, in plain PyTorch (SDPA).

A step's tokens are a flat list of chunks, one per sequence: `num_new` query tokens that follow
`num_cached` tokens already in the cache. The new K/V are written to their cache slots first, then
each query attends to its sequence's tokens up to and including itself. Decode chunks (one token
each) are batched into one SDPA call over keys gathered from their blocks; prefill chunks run one
SDPA call each, straight from the fresh K/V when nothing precedes them in the cache.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.nn import functional as F


@dataclass(frozen=True)
class ChunkLayout:
    """Where one sequence's new tokens sit in the step and in the cache."""

    row: int  # first row of the chunk in the step's flat token batch
    num_new: int
    num_cached: int  # tokens of this sequence already in the cache before this step
    block_table: Sequence[int]

    @property
    def context_len(self) -> int:
        return self.num_cached + self.num_new


@dataclass(frozen=True)
class PrefillSpan:
    start: int  # rows [start, end) of the step
    end: int
    context_index: torch.Tensor | None  # [context] cache slots to read; None: attend to the fresh K/V
    mask: torch.Tensor | None  # [1, 1, new, context] True = attend; None: plain causal


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot each new token's K/V is written to
    decode_rows: torch.Tensor | None  # [B] rows of the single-token chunks
    decode_index: torch.Tensor | None  # [B, L] cache slots each decode row reads (padded with slot 0)
    decode_mask: torch.Tensor | None  # [B, 1, 1, L] True = attend
    prefills: tuple[PrefillSpan, ...]


def build_metadata(
    chunks: Sequence[ChunkLayout], block_size: int, sliding_window: int | None, device: torch.device
) -> AttentionMetadata:
    """Compute, once per step, every index and mask the layers need."""
    slots: list[int] = []
    for chunk in chunks:
        slots.extend(_slots(chunk.block_table, block_size, chunk.num_cached, chunk.context_len))
    decodes = [c for c in chunks if c.num_new == 1 and c.num_cached > 0]
    prefills = tuple(
        _prefill_span(c, block_size, sliding_window, device)
        for c in chunks
        if not (c.num_new == 1 and c.num_cached > 0)
    )
    decode_rows = decode_index = decode_mask = None
    if decodes:
        width = max(c.context_len for c in decodes)
        index = torch.zeros((len(decodes), width), dtype=torch.long)
        lengths = torch.tensor([c.context_len for c in decodes])
        for i, c in enumerate(decodes):
            index[i, : c.context_len] = torch.tensor(_slots(c.block_table, block_size, 0, c.context_len))
        keys = torch.arange(width)[None, :]  # [1, L]
        mask = keys < lengths[:, None]
        if sliding_window is not None:
            mask &= keys > (lengths[:, None] - 1 - sliding_window)
        decode_rows = torch.tensor([c.row for c in decodes], device=device)
        decode_index = index.to(device)
        decode_mask = mask[:, None, None, :].to(device)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        decode_rows=decode_rows,
        decode_index=decode_index,
        decode_mask=decode_mask,
        prefills=prefills,
    )


def _slots(block_table: Sequence[int], block_size: int, start: int, end: int) -> list[int]:
    return [block_table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def _prefill_span(
    chunk: ChunkLayout, block_size: int, sliding_window: int | None, device: torch.device
) -> PrefillSpan:
    fresh = chunk.num_cached == 0
    windowed = sliding_window is not None and chunk.context_len > sliding_window
    context_index = None
    if not fresh:
        slots = _slots(chunk.block_table, block_size, 0, chunk.context_len)
        context_index = torch.tensor(slots, dtype=torch.long, device=device)
    mask = None
    if not fresh or windowed:
        queries = torch.arange(chunk.num_cached, chunk.context_len)[:, None]  # [new, 1]
        keys = torch.arange(chunk.context_len)[None, :]  # [1, context]
        allowed = keys <= queries
        if sliding_window is not None:
            allowed &= keys > queries - sliding_window
        mask = allowed[None, None].to(device)
    return PrefillSpan(chunk.row, chunk.row + chunk.num_new, context_index, mask)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> torch.Tensor:
    """q: [T, h, D]; k, v: [T, kv, D] (new tokens); caches: [num_blocks, block_size, kv, D].
    Writes k, v into the cache and returns the attention output [T, h * D]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)  # [slots, kv, D]
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    flat_k.index_copy_(0, meta.slot_mapping, k)
    flat_v.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        queries = q[meta.decode_rows].unsqueeze(2)  # [B, h, 1, D]
        keys = flat_k[meta.decode_index].transpose(1, 2)  # [B, kv, L, D]
        values = flat_v[meta.decode_index].transpose(1, 2)
        attended = F.scaled_dot_product_attention(
            queries, keys, values, attn_mask=meta.decode_mask, enable_gqa=True
        )  # [B, h, 1, D]
        out[meta.decode_rows] = attended.squeeze(2)
    for span in meta.prefills:
        queries = q[span.start : span.end].transpose(0, 1).unsqueeze(0)  # [1, h, new, D]
        if span.context_index is None:
            keys, values = k[span.start : span.end], v[span.start : span.end]
        else:
            keys, values = flat_k[span.context_index], flat_v[span.context_index]
        attended = F.scaled_dot_product_attention(
            queries,
            keys.transpose(0, 1).unsqueeze(0),  # [1, kv, context, D]
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=span.mask,
            is_causal=span.mask is None,
            enable_gqa=True,
        )
        out[span.start : span.end] = attended.squeeze(0).transpose(0, 1)
    return out.view(q.shape[0], -1)
