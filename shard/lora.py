"""LoRA adapters: load PEFT weights, check them against the base model, and add every token's adapter
delta inside a mixed batch.

Semantics, per target projection W: y = W x + scaling * B (A x), where A: [r, in], B: [out, r] and
scaling = alpha / r (alpha / sqrt(r) with rslora), as in PEFT, r and alpha per module where the config's
rank_pattern / alpha_pattern say so. One scaling for the whole adapter stays a scalar the backends
apply; per-module scalings are folded into each module's B at load, and the adapter's scaling is 1.

A loaded adapter is the CPU tier's copy; the backends' slot tiers (`lora_stacked` for the Triton
kernels, `lora_torch` for plain torch) copy it into their own layout when it takes a slot.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from loraplex.registry.adapter_config import IncompatibleAdapter, InvalidAdapter
from loraplex.registry.adapter_source import read_adapter
from loraplex.registry.adapter_weights import ModelFit, check_fit, lora_modules

__all__ = ["IncompatibleAdapter", "LoraAdapter", "load_adapter"]

_LAYER_MODULE = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(?:self_attn|mlp)\.(?P<name>\w+)$")


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    version: int
    rank: int
    scaling: float
    # per layer: module name -> (A [r, in], B [out, r])
    layers: tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], ...]
    # Unique per loaded copy (a name and version may come back with other weights after a delete),
    # so K/V cached under one adapter are never served to another.
    uid: int = field(default_factory=itertools.count(1).__next__, compare=False)

    @property
    def num_bytes(self) -> int:
        return sum(a.nbytes + b.nbytes for layer in self.layers for a, b in layer.values())


def load_adapter(
    source: str,
    name: str,
    version: int,
    targets: Mapping[str, tuple[int, int]],
    num_layers: int,
    max_rank: int,
    dtype: torch.dtype = torch.float32,
    pin_memory: bool = False,
) -> LoraAdapter:
    """Read and validate an adapter for a base model whose LoRA-targetable projections are `targets`
    (module path -> (in, out) features); its tensors are in host memory, page-locked with pin_memory.
    InvalidAdapter: bad source or config; IncompatibleAdapter: it does not fit this base model."""
    metadata, weights_bytes = read_adapter(source)
    try:
        tensors = load_safetensors(weights_bytes)
    except SafetensorError as error:
        raise InvalidAdapter(f"adapter_model.safetensors is not a valid safetensors file: {error}") from error
    modules = lora_modules({key: tensor.shape for key, tensor in tensors.items()}, metadata)
    check_fit(
        {path: (tensors[a].shape, tensors[b].shape) for path, (a, b) in modules.items()},
        ModelFit(targets, max_rank),
    )
    scalings = {path: metadata.module_scaling(path) for path in modules}
    uniform = len(set(scalings.values())) == 1
    layers: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = [{} for _ in range(num_layers)]
    for module_path, (a_key, b_key) in modules.items():
        a, b = tensors[a_key], tensors[b_key]
        if not uniform:
            b = b.to(torch.float32) * scalings[module_path]
        where = _LAYER_MODULE.match(module_path)
        assert where is not None  # every key of `targets` has this form
        layers[int(where["layer"])][where["name"]] = (
            _host(a, dtype, pin_memory),
            _host(b, dtype, pin_memory),
        )
    scaling = next(iter(scalings.values())) if uniform else 1.0
    return LoraAdapter(
        name=name, version=version, rank=metadata.max_rank, scaling=scaling, layers=tuple(layers)
    )


def _host(tensor: torch.Tensor, dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    tensor = tensor.to(dtype).contiguous()
    return tensor.pin_memory() if pin_memory else tensor
