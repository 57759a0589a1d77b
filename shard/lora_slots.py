"""Choose and build the slot tier of the LoRA backend: the Triton kernels' stacked buffers, or packed
adapters for the plain-torch path. Every tensor-parallel rank builds its own from its slice of the model."""

from __future__ import annotations

import torch

from loraplex.shard.lora_stacked import StackedLoraWeights
from loraplex.shard.lora_torch import PackedLoraSlots
from loraplex.shard.model import LlamaModel

LoraSlotWeights = StackedLoraWeights | PackedLoraSlots
BACKENDS = ("torch", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """`auto` is the plain-torch path on CPU and the Triton kernels on GPUs."""
    if backend == "auto":
        return "torch" if device.type == "cpu" else "triton"
    if backend not in BACKENDS:
        raise ValueError(f"lora_backend {backend!r} is not one of auto, {', '.join(BACKENDS)}")
    return backend


def build_lora_slots(
    model: LlamaModel,
    backend: str,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
    device: torch.device,
) -> LoraSlotWeights:
    layout = model.lora_layout()
    if resolve_backend(backend, device) == "torch":
        return PackedLoraSlots(layout, num_slots, dtype, device)
    return StackedLoraWeights(
        layout, model.lora_shard_shapes(), model.config.num_layers, num_slots, max_rank, dtype, device
    )
