"""LoRA adapters for the foundation backend: load PEFT weights, check them against the model, and
apply one adapter to the request being served.

Semantics, per target projection W: y = W x + scaling * B (A x), where A: [r, in], B: [out, r] and
scaling = alpha / r (alpha / sqrt(r) with rslora), as in PEFT. The multi-LoRA issue replaces the
forward hooks with batched kernels over adapter slots; this module stays the reference for them.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import nn
from torch.nn import functional as F

from loraplex.registry.adapter_source import InvalidAdapter, read_adapter

_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")


class IncompatibleAdapter(ValueError):
    """The adapter's shapes, rank or modules do not fit the loaded base model."""


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    version: int
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A [r, in], B [out, r])


def load_adapter(source: str, name: str, version: int, model: nn.Module, max_rank: int) -> LoraAdapter:
    """Read and validate an adapter for `model`. InvalidAdapter: bad source or config;
    IncompatibleAdapter: it does not fit this base model."""
    metadata, weights_bytes = read_adapter(source)
    if metadata.rank > max_rank:
        raise IncompatibleAdapter(
            f"adapter rank {metadata.rank} exceeds this shard's max_lora_rank {max_rank}"
        )
    try:
        tensors = load_safetensors(weights_bytes)
    except SafetensorError as error:
        raise InvalidAdapter(f"adapter_model.safetensors is not a valid safetensors file: {error}") from error
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _PEFT_KEY.match(key)
        if not match:
            raise IncompatibleAdapter(f"unexpected tensor {key!r}; only LoRA A/B weights are supported")
        halves.setdefault(match["module"], {})[match["half"]] = tensor
    dtype = next(model.parameters()).dtype
    weights = {}
    for module_path, pair in halves.items():
        weights[module_path] = _checked_pair(
            model, module_path, pair, metadata.rank, metadata.target_modules, dtype
        )
    if not weights:
        raise IncompatibleAdapter("the adapter holds no LoRA weights")
    scaling = metadata.alpha / (metadata.rank**0.5 if metadata.use_rslora else metadata.rank)
    return LoraAdapter(name=name, version=version, rank=metadata.rank, scaling=scaling, weights=weights)


def _checked_pair(
    model: nn.Module,
    module_path: str,
    pair: dict[str, torch.Tensor],
    rank: int,
    targets: tuple[str, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    if set(pair) != {"A", "B"}:
        raise IncompatibleAdapter(f"{module_path} needs both lora_A and lora_B weights")
    if module_path.rsplit(".", 1)[-1] not in targets:
        raise IncompatibleAdapter(f"{module_path} is not among the adapter's target_modules {list(targets)}")
    try:
        module = model.get_submodule(module_path)
    except AttributeError as error:
        raise IncompatibleAdapter(f"the base model has no module {module_path}") from error
    if not isinstance(module, nn.Linear):
        raise IncompatibleAdapter(f"{module_path} is not a linear layer")
    a, b = pair["A"], pair["B"]
    expected_a, expected_b = (rank, module.in_features), (module.out_features, rank)
    if tuple(a.shape) != expected_a or tuple(b.shape) != expected_b:
        raise IncompatibleAdapter(
            f"{module_path}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base model, "
            f"which needs {expected_a} / {expected_b}"
        )
    return a.to(dtype).contiguous(), b.to(dtype).contiguous()


@contextmanager
def applied(model: nn.Module, adapter: LoraAdapter | None) -> Iterator[None]:
    """Apply adapter to model's forward for the duration of the block (one request at a time)."""
    if adapter is None:
        yield
        return
    handles = []
    for module_path, (a, b) in adapter.weights.items():

        def add_delta(module, inputs, output, a=a, b=b):
            return output + adapter.scaling * F.linear(F.linear(inputs[0], a), b)

        handles.append(model.get_submodule(module_path).register_forward_hook(add_delta))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class AdapterCache:
    """Loaded adapters by (name, version), least recently used evicted first past max_adapters."""

    def __init__(self, max_adapters: int) -> None:
        self._max = max_adapters
        self._adapters: OrderedDict[tuple[str, int], LoraAdapter] = OrderedDict()

    def get(self, name: str, version: int) -> LoraAdapter | None:
        adapter = self._adapters.get((name, version))
        if adapter is not None:
            self._adapters.move_to_end((name, version))
        return adapter

    def put(self, adapter: LoraAdapter) -> None:
        self._adapters[(adapter.name, adapter.version)] = adapter
        self._adapters.move_to_end((adapter.name, adapter.version))
        while len(self._adapters) > self._max:
            self._adapters.popitem(last=False)

    def drop(self, name: str, version: int = 0) -> int:
        """Remove one version of name, or every version when version is 0; return how many."""
        keys = [key for key in self._adapters if key[0] == name and version in (0, key[1])]
        for key in keys:
            del self._adapters[key]
        return len(keys)

    def held(self) -> list[tuple[str, int]]:
        return list(self._adapters)
