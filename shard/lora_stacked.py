"""Adapters in stacked slot buffers, applied by the Triton kernels (the GPU path).

Each targetable projection of each layer has A [slots, max_rank, in] and B [slots, out, max_rank],
zero-padded past an adapter's rank and zero where an adapter does not target the projection, so one
kernel launch per projection serves every adapter in the batch. Writing a slot copies an adapter in
from its CPU-tier tensors.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from loraplex.shard.lora import LoraAdapter
from loraplex.shard.lora_ops import LoraStepMetadata
from loraplex.shard.lora_torch import ProjectionLayout

Projection = tuple[int, str]  # (layer, module name such as "q_proj")


class StackedLoraWeights:
    def __init__(
        self,
        layout: ProjectionLayout,
        shapes: Mapping[str, tuple[int, int]],
        num_layers: int,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """layout: the model's fused projections (see `LlamaModel.lora_layout`); shapes: module name ->
        (in, out) features of that module on this rank."""
        self.layout = layout
        self.a: dict[Projection, torch.Tensor] = {}
        self.b: dict[Projection, torch.Tensor] = {}
        for layer in range(num_layers):
            for module, (in_features, out_features) in shapes.items():
                self.a[layer, module] = torch.zeros(
                    num_slots, max_rank, in_features, dtype=dtype, device=device
                )
                self.b[layer, module] = torch.zeros(
                    num_slots, out_features, max_rank, dtype=dtype, device=device
                )
        self.scalings = torch.zeros(num_slots, dtype=torch.float32, device=device)
        self._targets: list[set[Projection]] = [set() for _ in range(num_slots)]  # what each slot adapts

    def write(self, slot: int, adapter: LoraAdapter) -> None:
        """Put adapter in slot (its previous occupant's weights are cleared)."""
        for projection in self._targets[slot]:
            self.a[projection][slot].zero_()
            self.b[projection][slot].zero_()
        self._targets[slot] = set()
        for layer, modules in enumerate(adapter.layers):
            for module, (a, b) in modules.items():
                rank = a.shape[0]
                self.a[layer, module][slot, :rank].copy_(a, non_blocking=True)
                self.b[layer, module][slot, :, :rank].copy_(b, non_blocking=True)
                self._targets[slot].add((layer, module))
        self.scalings[slot] = adapter.scaling
        if self.scalings.is_cuda:
            # The copies from pinned memory are only queued: wait for them here, where the slot's load is
            # timed (loraplex_adapter_load_seconds{tier="gpu"}), not in the next step, which would
            # otherwise wait for them unseen while the metric counted only their queueing.
            torch.cuda.current_stream(self.scalings.device).synchronize()

    def targeted(self, projection: Projection, slots: set[int]) -> bool:
        return any(projection in self._targets[slot] for slot in slots)

    def batch(self, meta: LoraStepMetadata) -> KernelLoraBatch:
        return KernelLoraBatch(meta, self)


class KernelLoraBatch:
    """The step's adapter mapping for the Triton path; same contract as `lora_torch.TorchLoraBatch`."""

    def __init__(self, meta: LoraStepMetadata, weights: StackedLoraWeights) -> None:
        from loraplex.shard import lora_kernels  # Triton is only imported where the kernels run

        self._kernels = lora_kernels
        self.meta = meta
        self.weights = weights
        self._slots = {slot for _, _, slot in meta.segments if slot >= 0}

    def add(self, layer: int, projection: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """For each module of the fused projection: out[rows of s, module's columns] +=
        scalings[slot_s] * (x[rows of s] @ A[slot_s]^T) @ B[slot_s]^T."""
        for module, offset, size in self.weights.layout[projection]:
            if not self.weights.targeted((layer, module), self._slots):
                continue  # no adapter in this step touches the module: skip both launches
            shrunk = self._kernels.shrink(x, self.weights.a[layer, module], self.meta)  # [T, R]
            b = self.weights.b[layer, module]
            self._kernels.expand(out, shrunk, b, self.weights.scalings, self.meta, offset, size)
