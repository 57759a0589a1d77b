"""Triton SGMV kernels for multi-LoRA (punica/vLLM style): `shrink` (x @ A^T per segment) and `expand`
(scaled shrunk @ B^T per segment, added in place). Same semantics, arguments and checks as
`shrink_reference` / `expand_reference` in `lora_ops`, which document them in full.

One launch serves prefill and decode: the grid is (segment with an adapter, token block, output block),
and a program whose token block lies past its segment's end returns at once. Slots of different ranks
rely on the buffers' zero padding to the max rank. On CPU tensors the kernels run only under
TRITON_INTERPRET=1, whose tl.dot mishandles bfloat16, so there both operands are cast to float32 first.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.shard.lora_ops import LoraStepMetadata, check_expand_args, check_shrink_args

_MIN_DOT = 16  # tl.dot needs every dimension >= 16: smaller blocks are padded up and masked
_MAX_BLOCK_M = 64
_MAX_BLOCK_R = 64
_BLOCK_K = 64  # in_features per shrink step
_BLOCK_N = 64  # output features per expand program


@triton.jit
def _shrink_kernel(
    x_ptr,  # [T, in]
    a_ptr,  # [N, R, in]
    out_ptr,  # [T, R] float32, zero-filled
    starts_ptr,  # [S] int32
    lengths_ptr,  # [S] int32
    slots_ptr,  # [S] int32
    active_ptr,  # [A] int32
    in_features,
    rank,
    stride_xm,
    stride_an,
    stride_ar,
    stride_om,
    BLOCK_M: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    CAST_FP32: tl.constexpr,
):
    segment = tl.load(active_ptr + tl.program_id(0))
    length = tl.load(lengths_ptr + segment)
    first = tl.program_id(1) * BLOCK_M
    if first >= length:
        return
    start = tl.load(starts_ptr + segment).to(tl.int64)
    slot = tl.load(slots_ptr + segment).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_r = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_m = offs_m < length
    mask_r = offs_r < rank
    rows = start + offs_m  # [BLOCK_M] int64
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for step in range(0, tl.cdiv(in_features, BLOCK_K)):
        # a new name, not `step = ...`: rebinding a loop variable trips the compiler's software
        # pipeliner (triton-lang/triton#2015), though the interpreter takes it
        k_block = tl.cast(step, tl.int32)
        offs_k = k_block * BLOCK_K + tl.arange(0, BLOCK_K)
        mask_k = offs_k < in_features
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_K]
        a = tl.load(
            a_ptr + slot * stride_an + offs_r[None, :] * stride_ar + offs_k[:, None],
            mask=mask_k[:, None] & mask_r[None, :],
            other=0.0,
        )  # [BLOCK_K, BLOCK_R]: A[slot]^T
        if CAST_FP32:
            x = x.to(tl.float32)
            a = a.to(tl.float32)
        acc += tl.dot(x, a, input_precision="ieee")
    tl.store(
        out_ptr + rows[:, None] * stride_om + offs_r[None, :],
        acc,
        mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.jit
def _expand_kernel(
    y_ptr,  # [T, Y], feature stride 1
    shrunk_ptr,  # [T, R] float32
    b_ptr,  # [N, out_size, R]
    scalings_ptr,  # [N] float32
    starts_ptr,  # [S] int32
    lengths_ptr,  # [S] int32
    slots_ptr,  # [S] int32
    active_ptr,  # [A] int32
    out_offset,
    out_size,
    rank,
    stride_ym,
    stride_sm,
    stride_bn,
    stride_bo,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr,
):
    segment = tl.load(active_ptr + tl.program_id(0))
    length = tl.load(lengths_ptr + segment)
    first = tl.program_id(1) * BLOCK_M
    if first >= length:
        return
    start = tl.load(starts_ptr + segment).to(tl.int64)
    slot = tl.load(slots_ptr + segment).to(tl.int64)
    offs_m = first + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < length
    mask_n = offs_n < out_size
    rows = start + offs_m  # [BLOCK_M] int64
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, tl.cdiv(rank, BLOCK_R)):
        r_block = tl.cast(step, tl.int32)  # not `step = ...`: see the shrink kernel
        offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        s = tl.load(
            shrunk_ptr + rows[:, None] * stride_sm + offs_r[None, :],
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )  # [BLOCK_M, BLOCK_R] float32
        b = tl.load(
            b_ptr + slot * stride_bn + offs_n[None, :] * stride_bo + offs_r[:, None],
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)  # [BLOCK_R, BLOCK_N]: B[slot]^T
        acc += tl.dot(s, b, input_precision=PRECISION)
    acc *= tl.load(scalings_ptr + slot)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + (out_offset + offs_n)[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0)
    tl.store(y_ptrs, (y.to(tl.float32) + acc).to(y.dtype), mask=mask)


def shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraStepMetadata) -> torch.Tensor:
    """Semantics: shrunk[rows of s] = x[rows of s] @ lora_a[slot_s]^T for each segment s with a slot.

    x: [T, in] float32/bfloat16/float16, contiguous; lora_a: [N, R, in], x's dtype, contiguous,
    zero-padded past each rank; meta: the step's metadata, on x's device. Returns shrunk: [T, R]
    float32 (rows of slot -1 segments zero). Without any adapter in the step nothing is launched."""
    check_shrink_args(x, lora_a, meta)
    num_tokens, in_features = x.shape  # [T, in]
    rank = lora_a.shape[1]  # lora_a: [N, R, in]
    shrunk = torch.zeros(num_tokens, rank, dtype=torch.float32, device=x.device)  # [T, R]
    if not meta.has_lora or rank == 0 or in_features == 0:
        return shrunk
    block_m = _block(meta.max_segment_length, _MAX_BLOCK_M)
    block_r = _block(rank, _MAX_BLOCK_R)
    grid = (
        meta.num_active_segments,
        triton.cdiv(meta.max_segment_length, block_m),
        triton.cdiv(rank, block_r),
    )
    _shrink_kernel[grid](
        x,
        lora_a,
        shrunk,
        meta.segment_starts,
        meta.segment_lengths,
        meta.segment_slots,
        meta.active_segments,
        in_features,
        rank,
        x.stride(0),
        lora_a.stride(0),
        lora_a.stride(1),
        shrunk.stride(0),
        BLOCK_M=block_m,
        BLOCK_R=block_r,
        BLOCK_K=_BLOCK_K,
        CAST_FP32=x.device.type == "cpu",  # the interpreter's tl.dot gets bfloat16 wrong
    )
    return shrunk


def expand(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    meta: LoraStepMetadata,
    out_offset: int = 0,
    out_size: int | None = None,
) -> None:
    """Semantics: y[rows of s, out_offset:out_offset+out_size] += scalings[slot_s] * shrunk[rows of s]
    @ lora_b[slot_s]^T for each segment s with a slot, in place (summed in float32, rounded once).

    y: [T, Y] float32/bfloat16/float16 with feature stride 1; shrunk: [T, R] float32 from `shrink`;
    lora_b: [N, out_size, R], y's dtype, contiguous, zero-padded past each rank; scalings: [N] float32;
    meta: the step's metadata, on y's device; out_size defaults to lora_b.shape[1] and must equal it.
    Without any adapter in the step nothing is launched."""
    out_size = check_expand_args(y, shrunk, lora_b, scalings, meta, out_offset, out_size)
    rank = lora_b.shape[2]  # lora_b: [N, out_size, R]
    if not meta.has_lora or rank == 0 or out_size == 0:
        return
    block_m = _block(meta.max_segment_length, _MAX_BLOCK_M)
    grid = (
        meta.num_active_segments,
        triton.cdiv(meta.max_segment_length, block_m),
        triton.cdiv(out_size, _BLOCK_N),
    )
    _expand_kernel[grid](
        y,
        shrunk,
        lora_b,
        scalings,
        meta.segment_starts,
        meta.segment_lengths,
        meta.segment_slots,
        meta.active_segments,
        out_offset,
        out_size,
        rank,
        y.stride(0),
        shrunk.stride(0),
        lora_b.stride(0),
        lora_b.stride(1),
        BLOCK_M=block_m,
        BLOCK_N=_BLOCK_N,
        BLOCK_R=_block(rank, _MAX_BLOCK_R),
        # float32 y: exact products; otherwise the backend default (tf32 on NVIDIA holds bf16/fp16 B exactly)
        PRECISION="ieee" if y.dtype == torch.float32 else None,
    )


def _block(size: int, largest: int) -> int:
    """A power-of-two block covering size, at least tl.dot's minimum and at most largest."""
    return min(largest, max(_MIN_DOT, triton.next_power_of_2(size)))
