"""Multi-LoRA ops over GPU adapter slots: the per-step metadata, the input checks, and the plain-torch
shrink/expand that serve CPUs and are the reference for the Triton kernels in `lora_kernels`.

Semantics, per targeted projection (as `LoraBatch.add`): for each segment s of the step's tokens that
uses adapter slot k, out[rows of s] += scalings[k] * (x[rows of s] @ lora_a[k]^T) @ lora_b[k]^T.
Adapter weights sit in stacked per-projection slot buffers, zero-padded to the shard's max rank R:
lora_a [N, R, in], lora_b [N, out, R], scalings [N] float32. The ops rely on that zero padding (an
adapter of rank r < R contributes nothing through rows r.. of A or columns r.. of B), so slots of
different ranks mix in one launch without a per-slot rank table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

NO_SLOT = -1  # the slot of tokens that use the base model alone
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (atol, rtol) within which the Triton kernels match the references here, per dtype name, applied as
# torch.testing.assert_close does: float32 sums differ in order; y is rounded once to its dtype. The
# kernel tests and `loraplex bench kernels` (on GPUs) both check against these.
KERNEL_TOLERANCES = {"float32": (1e-4, 1e-4), "float16": (5e-3, 5e-3), "bfloat16": (2e-2, 1.6e-2)}


@dataclass(frozen=True)
class LoraStepMetadata:
    """Which rows of the step's token batch use which adapter slot, built once per step by
    `build_lora_metadata` and shared by every targeted projection of every layer.

    Segments are maximal runs of consecutive tokens with one slot; together they cover [0, num_tokens) in
    order. The kernels' grid runs over `active_segments` only, so slot -1 segments are never launched."""

    segments: tuple[tuple[int, int, int], ...]  # host copy: (start, length, slot) per segment
    segment_starts: torch.Tensor  # [S] int32
    segment_lengths: torch.Tensor  # [S] int32, each > 0
    segment_slots: torch.Tensor  # [S] int32, -1 = no adapter
    active_segments: torch.Tensor  # [A] int32: indices of the segments with a slot >= 0
    max_segment_length: int  # longest segment with an adapter (0 without any): sizes the grid
    num_tokens: int  # T
    max_slot: int  # highest slot in use (-1 without any): checked against the slot buffers on the host
    has_lora: bool  # False: no token uses an adapter and the ops return without launching anything

    def __post_init__(self) -> None:
        position = 0
        for start, length, slot in self.segments:
            if start != position or length <= 0 or slot < NO_SLOT:
                raise ValueError(
                    f"segment (start={start}, length={length}, slot={slot}) breaks the cover of "
                    f"[0, {self.num_tokens}): segments must be non-empty, in order, from row {position}"
                )
            position += length
        if position != self.num_tokens:
            raise ValueError(f"segments cover [0, {position}) but the step has {self.num_tokens} tokens")
        active = [(length, slot) for _, length, slot in self.segments if slot != NO_SLOT]
        expected = (
            len(active) > 0,
            max((slot for _, slot in active), default=NO_SLOT),
            max((length for length, _ in active), default=0),
        )
        if (self.has_lora, self.max_slot, self.max_segment_length) != expected:
            raise ValueError(
                f"has_lora/max_slot/max_segment_length {self.has_lora}/{self.max_slot}/"
                f"{self.max_segment_length} disagree with the segments, which give {expected}"
            )
        tensors = {
            "segment_starts": (self.segment_starts, len(self.segments)),
            "segment_lengths": (self.segment_lengths, len(self.segments)),
            "segment_slots": (self.segment_slots, len(self.segments)),
            "active_segments": (self.active_segments, len(active)),
        }
        for name, (tensor, size) in tensors.items():
            if tensor.dtype != torch.int32 or tuple(tensor.shape) != (size,) or not tensor.is_contiguous():
                raise ValueError(
                    f"{name} must be a contiguous int32 tensor of shape ({size},), "
                    f"got {tensor.dtype} {tuple(tensor.shape)}"
                )
            if tensor.device != self.device:
                raise ValueError(f"{name} is on {tensor.device}, segment_starts on {self.device}")

    @property
    def device(self) -> torch.device:
        return self.segment_starts.device

    @property
    def num_active_segments(self) -> int:
        return self.active_segments.shape[0]


def build_lora_metadata(
    runs: Sequence[tuple[int, int]], device: torch.device | str = "cpu"
) -> LoraStepMetadata:
    """The step's metadata from its (slot, num_tokens) runs in token order (slot -1 = no adapter).
    Empty runs are dropped and neighbouring runs of one slot merged; the device tensors are views of one
    buffer, filled on the host and copied over once (pinned and non-blocking on CUDA)."""
    segments: list[tuple[int, int, int]] = []
    num_tokens = 0
    for slot, length in runs:
        if length < 0 or slot < NO_SLOT:
            raise ValueError(f"run (slot={slot}, num_tokens={length}): need slot >= -1 and num_tokens >= 0")
        if length == 0:
            continue
        if segments and segments[-1][2] == slot:
            start, previous, _ = segments[-1]
            segments[-1] = (start, previous + length, slot)
        else:
            segments.append((num_tokens, length, slot))
        num_tokens += length
    active = [index for index, (_, _, slot) in enumerate(segments) if slot != NO_SLOT]
    num_segments = len(segments)
    host = torch.tensor(
        [start for start, _, _ in segments]
        + [length for _, length, _ in segments]
        + [slot for _, _, slot in segments]
        + active,
        dtype=torch.int32,
    )  # [3 * S + A]
    device = torch.device(device)
    if device.type == "cuda":
        host = host.pin_memory()
    packed = host.to(device, non_blocking=True)
    return LoraStepMetadata(
        segments=tuple(segments),
        segment_starts=packed[:num_segments],
        segment_lengths=packed[num_segments : 2 * num_segments],
        segment_slots=packed[2 * num_segments : 3 * num_segments],
        active_segments=packed[3 * num_segments :],
        max_segment_length=max((segments[index][1] for index in active), default=0),
        num_tokens=num_tokens,
        max_slot=max((segments[index][2] for index in active), default=NO_SLOT),
        has_lora=bool(active),
    )


def check_shrink_args(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraStepMetadata) -> None:
    """ValueError naming what is wrong with shrink's arguments (host-side checks only: no device sync)."""
    _check_dims(x=(x, 2), lora_a=(lora_a, 3))
    if x.shape[1] != lora_a.shape[2]:
        raise ValueError(
            f"x has {x.shape[1]} in_features but lora_a {tuple(lora_a.shape)} expects {lora_a.shape[2]}"
        )
    _check_dtype("x", x)
    if lora_a.dtype != x.dtype:
        raise ValueError(f"lora_a is {lora_a.dtype} but x is {x.dtype}; they must match")
    _check_contiguous(x=x, lora_a=lora_a)
    _check_device(meta, x=x, lora_a=lora_a)
    _check_meta(meta, num_tokens=x.shape[0], num_slots=lora_a.shape[0])


def check_expand_args(
    y: torch.Tensor,
    shrunk: torch.Tensor,
    lora_b: torch.Tensor,
    scalings: torch.Tensor,
    meta: LoraStepMetadata,
    out_offset: int,
    out_size: int | None,
) -> int:
    """ValueError naming what is wrong with expand's arguments; returns the slice width out_size."""
    _check_dims(y=(y, 2), shrunk=(shrunk, 2), lora_b=(lora_b, 3), scalings=(scalings, 1))
    num_slots, slice_size, rank = lora_b.shape
    if out_size is None:
        out_size = slice_size
    if out_size != slice_size:
        raise ValueError(f"out_size {out_size} differs from lora_b's out_features {slice_size}")
    if out_offset < 0 or out_offset + out_size > y.shape[1]:
        raise ValueError(
            f"slice [{out_offset}, {out_offset + out_size}) does not fit y's {y.shape[1]} output features"
        )
    if shrunk.shape != (y.shape[0], rank):
        raise ValueError(f"shrunk is {tuple(shrunk.shape)}, expected ({y.shape[0]}, {rank}) for y and lora_b")
    if scalings.shape[0] != num_slots:
        raise ValueError(f"scalings has {scalings.shape[0]} entries for {num_slots} slots in lora_b")
    _check_dtype("y", y)
    if lora_b.dtype != y.dtype:
        raise ValueError(f"lora_b is {lora_b.dtype} but y is {y.dtype}; they must match")
    for name, tensor in (("shrunk", shrunk), ("scalings", scalings)):
        if tensor.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {tensor.dtype}")
    if y.shape[1] > 0 and y.stride(1) != 1:
        raise ValueError(f"y's rows must be contiguous (feature stride 1), got strides {y.stride()}")
    _check_contiguous(shrunk=shrunk, lora_b=lora_b, scalings=scalings)
    _check_device(meta, y=y, shrunk=shrunk, lora_b=lora_b, scalings=scalings)
    _check_meta(meta, num_tokens=y.shape[0], num_slots=num_slots)
    return out_size


def shrink_reference(x: torch.Tensor, lora_a: torch.Tensor, meta: LoraStepMetadata) -> torch.Tensor:
    """Semantics: shrunk[rows of s] = x[rows of s] @ lora_a[slot_s]^T for each segment s with a slot.

    x: [T, in] float32/bfloat16/float16; lora_a: [N, R, in], x's dtype, zero-padded past each rank;
    meta: the step's metadata. Returns shrunk: [T, R] float32 (accumulated in float32; rows of slot -1
    segments are zero)."""
    check_shrink_args(x, lora_a, meta)
    shrunk = torch.zeros(x.shape[0], lora_a.shape[1], dtype=torch.float32, device=x.device)  # [T, R]
    for start, length, slot in meta.segments:
        if slot != NO_SLOT:
            rows = slice(start, start + length)
            shrunk[rows] = x[rows].float() @ lora_a[slot].float().t()
    return shrunk


def expand_reference(
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

    y: [T, Y] float32/bfloat16/float16, feature stride 1 (the projection's output; a fused qkv/gate_up
    output is targeted slice by slice with out_offset); shrunk: [T, R] float32 from shrink;
    lora_b: [N, out_size, R], y's dtype, zero-padded past each rank; scalings: [N] float32;
    meta: the step's metadata; out_size defaults to lora_b.shape[1] and must equal it."""
    out_size = check_expand_args(y, shrunk, lora_b, scalings, meta, out_offset, out_size)
    columns = slice(out_offset, out_offset + out_size)
    for start, length, slot in meta.segments:
        if slot != NO_SLOT:
            rows = slice(start, start + length)
            delta = (shrunk[rows] @ lora_b[slot].float().t()) * scalings[slot]  # [n, out_size]
            y[rows, columns] = (y[rows, columns].float() + delta).to(y.dtype)


def _check_dims(**tensors: tuple[torch.Tensor, int]) -> None:
    for name, (tensor, ndim) in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != ndim:
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise ValueError(f"{name} must be a {ndim}-D tensor, got {shape}")


def _check_dtype(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} is {tensor.dtype}; supported: float32, bfloat16, float16")


def _check_contiguous(**tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")


def _check_device(meta: LoraStepMetadata, **tensors: torch.Tensor) -> None:
    for name, tensor in tensors.items():
        if tensor.device != meta.device:
            raise ValueError(f"{name} is on {tensor.device} but the step metadata is on {meta.device}")


def _check_meta(meta: LoraStepMetadata, num_tokens: int, num_slots: int) -> None:
    if meta.num_tokens != num_tokens:
        raise ValueError(
            f"the metadata's segments cover {meta.num_tokens} tokens, the tensors have {num_tokens}"
        )
    if meta.max_slot >= num_slots:
        raise ValueError(f"slot {meta.max_slot} is in use but the slot buffers hold only {num_slots} slots")
