"""Tensor-parallel building blocks: each rank holds a slice of a layer's weights.

Column-parallel layers split the output features (no communication); row-parallel layers split the
input features and all-reduce the partial sums. At tp_size == 1 they are ordinary layers. Each
parameter carries a `weight_loader` that takes the full checkpoint tensor and keeps this rank's slice,
so checkpoint loading never needs to know how a layer is split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1

    def split(self, total: int, what: str) -> int:
        if total % self.size:
            raise ValueError(f"{what} ({total}) does not divide by the tensor-parallel size {self.size}")
        return total // self.size


def _parameter(shape: tuple[int, ...], loader) -> nn.Parameter:
    param = nn.Parameter(torch.empty(shape), requires_grad=False)
    param.weight_loader = loader  # type: ignore[attr-defined]
    return param


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split by output rows. `output_sizes` names the fused parts (e.g. q, k, v),
    each split separately, so a fused projection loads from separate checkpoint tensors."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.full_output_sizes = tuple(output_sizes)
        self.output_sizes = tuple(tp.split(size, "output features") for size in output_sizes)
        self.offsets = tuple(sum(self.output_sizes[:i]) for i in range(len(self.output_sizes)))
        total = sum(self.output_sizes)
        self.weight = _parameter((total, input_size), self._load)
        self.bias = _parameter((total,), self._load) if bias else None

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        size = self.output_sizes[part]
        piece = loaded.narrow(0, self.tp.rank * size, size)
        param.data.narrow(0, self.offsets[part], size).copy_(piece)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projection; KV heads are replicated when there are fewer of them than ranks."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool,
        tp: TensorParallel,
    ) -> None:
        self.num_kv_replicas = max(1, tp.size // num_kv_heads)
        kv_size = max(num_kv_heads, tp.size) * head_dim
        super().__init__(hidden_size, (num_heads * head_dim, kv_size, kv_size), bias, tp)
        self.num_kv_heads_full = num_kv_heads
        self.head_dim = head_dim

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        if part == 0 or self.num_kv_replicas == 1:
            return super()._load(param, loaded, part)
        size = self.output_sizes[part]  # one KV head, shared by num_kv_replicas ranks
        head = self.tp.rank // self.num_kv_replicas
        param.data.narrow(0, self.offsets[part], size).copy_(loaded.narrow(0, head * size, size))


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split by input columns; partial sums all-reduced across ranks."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.full_input_size = input_size
        self.input_size = tp.split(input_size, "input features")
        self.output_sizes, self.offsets = (output_size,), (0,)  # one part, as ColumnParallelLinear names them
        self.weight = _parameter((output_size, self.input_size), self._load_weight)
        self.bias = _parameter((output_size,), self._load_bias) if bias else None

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.input_size, self.input_size))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        param.data.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial product only; call `reduce` after adding any other partial terms (e.g. LoRA)."""
        return F.linear(x, self.weight)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1:
            dist.all_reduce(partial)
        return partial if self.bias is None else partial + self.bias


class VocabEmbedding(nn.Module):
    """The token embedding, replicated on every rank: it is a lookup (no FLOPs to split) and small
    next to the transformer layers for the models we serve."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = _parameter((vocab_size, hidden_size), self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        param.data.copy_(loaded)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)
