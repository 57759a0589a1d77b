"""Choose and build the slot tier of the LoRA backend: the Triton kernels' stacked buffers, or packed
adapters for the plain-torch path. Every tensor-parallel rank builds its own from its slice of the model."""

from __future__ import annotations

import torch

from loraplex.shard.lora import LoraAdapter
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


class RankAdapters:
    """This rank's slice of every adapter in the CPU tier, cut once as the adapter arrives (and packed
    ahead for the torch path), then written into slots; the first rank and every other rank keep
    one each, so an adapter is sliced the same way everywhere and only once per rank."""

    def __init__(self, model: LlamaModel, weights: LoraSlotWeights) -> None:
        self._model = model
        self._weights = weights
        # adapter uid -> this rank's slice; filled by loader threads, read by the engine thread
        # (single dict operations, atomic under the GIL)
        self._slices: dict[int, LoraAdapter] = {}

    def add(self, adapter: LoraAdapter) -> None:
        piece = self._model.shard_adapter(adapter)
        self._slices[adapter.uid] = piece
        if isinstance(self._weights, PackedLoraSlots):
            self._weights.prepare(piece)

    def forget(self, adapter_uid: int) -> None:
        """The adapter left the CPU tier (a slot holding it keeps its own copy)."""
        self._slices.pop(adapter_uid, None)
        if isinstance(self._weights, PackedLoraSlots):
            self._weights.forget(adapter_uid)

    def write(self, slot: int, adapter_uid: int, adapter: LoraAdapter | None = None) -> None:
        """Put the adapter's slice in slot: the one kept for its uid, else cut from `adapter` (forgotten
        after a delete while a request still held it, or never added)."""
        piece = self._slices.get(adapter_uid)
        if piece is None:
            if adapter is None:
                raise KeyError(f"adapter {adapter_uid} was never added on this rank")
            piece = self._model.shard_adapter(adapter)
        self._weights.write(slot, piece)
