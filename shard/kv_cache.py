"""The paged KV cache: one preallocated tensor cut into fixed-size blocks, sized from a byte budget."""

from __future__ import annotations

import os

import torch

from loraplex.shard.model import LlamaModel

DEFAULT_CPU_KV_BYTES = 1 << 30  # 1 GiB; SmolLM2 fits ~22k tokens in it at fp32
CPU_FRACTION_CAP = 0.25  # never more than this share of the memory available at start-up
DEFAULT_GPU_MEMORY_FRACTION = 0.9


def kv_budget_bytes(device: torch.device, kv_cache_bytes: int, gpu_memory_fraction: float) -> int:
    """The explicit budget if given; otherwise a share of what the device has free after the weights."""
    if kv_cache_bytes > 0:
        return kv_cache_bytes
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        used_elsewhere = total - free
        return max(0, int(total * gpu_memory_fraction) - used_elsewhere)
    available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return min(DEFAULT_CPU_KV_BYTES, int(available * CPU_FRACTION_CAP))


def allocate_kv_cache(model: LlamaModel, num_blocks: int, block_size: int) -> torch.Tensor:
    """Allocate K and V for every layer and hand each attention module its views.

    Returns the whole cache, [layers, 2, num_blocks, block_size, kv heads, head_dim]. It is zeroed:
    padded attention reads unused slots with zero weight, and 0 * NaN garbage would still be NaN.
    """
    attention = model.layers[0].self_attn
    param = next(model.parameters())
    cache = torch.zeros(
        (len(model.layers), 2, num_blocks, block_size, attention.num_kv_heads, attention.head_dim),
        dtype=param.dtype,
        device=param.device,
    )
    for layer, kv in zip(model.layers, cache, strict=True):
        layer.self_attn.k_cache = kv[0]
        layer.self_attn.v_cache = kv[1]
    return cache


def num_blocks_for(budget_bytes: int, bytes_per_token: int, block_size: int) -> int:
    return budget_bytes // (bytes_per_token * block_size)
