"""Adapters applied with plain torch matmuls (the CPU path): each slot holds its adapter packed per
fused projection, so one targeted projection costs two matmuls per adapter segment of the step.

Packing happens once per loaded adapter, on the loader thread as it enters the CPU tier (`prepare`),
so taking a slot on the engine thread is a pointer swap. For a fused projection such as qkv_proj the
targeted modules' A are stacked into one [in, r_q + r_k + r_v] matrix (they read the same input) and
their B laid out block-diagonally into [r_q + r_k + r_v, q | k | v] with the scaling folded in. A step
then runs out[rows] += (x[rows] @ A) @ B per segment, instead of one shrink and one expand per module:
on CPU the cost of a LoRA delta for a decode row is the op dispatch, not the arithmetic, so fewer,
fatter ops are what makes a batch of many adapters nearly as fast as the base model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loraplex.shard.lora import LoraAdapter
from loraplex.shard.lora_ops import NO_SLOT, LoraStepMetadata

# fused projection -> its LoRA-targetable modules as (module, first output column, output columns)
ProjectionLayout = Mapping[str, tuple[tuple[str, int, int], ...]]
Packed = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # (layer, projection) -> (A, B)


def pack_adapter(adapter: LoraAdapter, layout: ProjectionLayout, dtype: torch.dtype, device) -> Packed:
    """The adapter's weights per (layer, fused projection) it targets: A [in, R], B [R, out] (scaled).

    Layers that target the same modules of a projection at the same ranks (rank_pattern may vary them)
    are packed together, as [layers, ...] tensors whose per-layer slices are the results: a few dozen
    torch ops per adapter instead of a dozen per layer, which is what a load under a busy engine pays
    for (each op waits for the GIL)."""
    packed: Packed = {}
    for projection, slices in layout.items():
        groups: dict[tuple, list[int]] = {}
        for layer, modules in enumerate(adapter.layers):
            targeted = tuple(piece for piece in slices if piece[0] in modules)
            if targeted:
                ranks = tuple(modules[name][0].shape[0] for name, _, _ in targeted)
                groups.setdefault((targeted, ranks), []).append(layer)
        out_features = sum(size for _, _, size in slices)
        for (targeted, _), layers in groups.items():
            pairs = zip(*_pack_layers(adapter, layers, targeted, out_features, dtype, device), strict=True)
            packed.update(zip([(layer, projection) for layer in layers], pairs, strict=True))
    return packed


def _pack_layers(
    adapter: LoraAdapter,
    layers: list[int],
    targeted: tuple[tuple[str, int, int], ...],
    out_features: int,
    dtype: torch.dtype,
    device,
) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """A [in, R] and B [R, out] for each of layers, which target the same modules of one projection."""

    def stacked(name: str, half: int) -> torch.Tensor:  # the module's A (0) or B (1) of every layer
        return torch.stack([adapter.layers[layer][name][half] for layer in layers])

    a = torch.cat([stacked(name, 0) for name, _, _ in targeted], dim=1)  # [L, R, in]
    a = a.transpose(1, 2).to(device=device, dtype=dtype).contiguous()  # [L, in, R]
    b = torch.zeros(len(layers), a.shape[2], out_features, dtype=dtype, device=device)  # [L, R, out]
    row = 0
    for name, offset, size in targeted:
        module_b = stacked(name, 1)  # [L, size, r]
        rank = module_b.shape[2]
        b[:, row : row + rank, offset : offset + size] = module_b.transpose(1, 2) * adapter.scaling
        row += rank
    return a.unbind(0), b.unbind(0)


class PackedLoraSlots:
    """The slot tier for the torch path: each slot's adapter, packed (see module docstring)."""

    def __init__(
        self, layout: ProjectionLayout, num_slots: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.device = device
        self.slots: list[Packed] = [{} for _ in range(num_slots)]
        # adapter uid -> packed weights, filled by loader threads and read by the engine thread
        # (single dict operations, atomic under the GIL)
        self._prepared: dict[int, Packed] = {}

    def prepare(self, adapter: LoraAdapter) -> None:
        """Pack the adapter ahead of its first slot (any thread): the engine thread then only swaps."""
        self._prepared[adapter.uid] = pack_adapter(adapter, self.layout, self.dtype, self.device)

    def forget(self, adapter_uid: int) -> None:
        """The adapter left the CPU tier: drop its packed copy (a slot holding it keeps its own)."""
        self._prepared.pop(adapter_uid, None)

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        packed = self._prepared.get(adapter.uid)
        if packed is None:  # loaded without prepare (tests, preloads): pack here
            packed = pack_adapter(adapter, self.layout, self.dtype, self.device)
        self.slots[slot] = packed

    def batch(self, meta: LoraStepMetadata) -> TorchLoraBatch:
        return TorchLoraBatch(meta, self)


class TorchLoraBatch:
    """The step's adapter mapping for the torch path (rows of slot -1 segments use the base alone).

    A LoRA GEMM here is a few rows by a rank: on one thread it costs about half of what it costs
    when the BLAS wakes the intra-op workers for it, so the deltas run single-threaded (measured:
    -23% LoRA time at 26 segments on 2 cores; a long prefill segment loses a little, the step far less)."""

    def __init__(self, meta: LoraStepMetadata, weights: PackedLoraSlots) -> None:
        self._lengths = [length for _, length, _ in meta.segments]
        self._slots = [weights.slots[slot] if slot != NO_SLOT else None for _, _, slot in meta.segments]
        self._num_threads = torch.get_num_threads()

    def add(self, layer: int, projection: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[rows of s] += (x[rows of s] @ A_s) @ B_s for each segment s whose adapter targets any
        module of projection in layer. x: [T, in]; out: [T, out], the fused projection's output."""
        torch.set_num_threads(1)  # the calling thread's setting: running threads keep their own
        try:
            segments = zip(x.split(self._lengths), out.split(self._lengths), self._slots, strict=True)
            for rows_in, rows_out, packed in segments:
                weights = packed.get((layer, projection)) if packed is not None else None
                if weights is not None:
                    a, b = weights
                    rows_out.addmm_(rows_in @ a, b)
        finally:
            torch.set_num_threads(self._num_threads)
