"""Tensor-parallel building blocks: each rank holds a slice of a layer's weights.

Column-parallel layers split the output features (no communication); row-parallel layers split the
input features and all-reduce the partial sums. At tp_size == 1 they are ordinary layers. Each
parameter carries a `weight_loader` that takes the full checkpoint tensor and keeps this rank's slice,
so checkpoint loading never needs to know how a layer is split.

LoRA follows the S-LoRA scheme: a column-parallel layer keeps A whole and B's rows for its own output
features; a row-parallel layer keeps A's columns for its own input features and B whole, so its LoRA
term is a partial sum that joins the base layer's one all-reduce (`shard_lora` cuts an adapter).
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


def check_shape(loaded: torch.Tensor, expected: Sequence[int]) -> None:
    """Refuse a checkpoint tensor whose full shape is not the one the config implies: slicing or
    broadcasting it would load wrong weights without a word."""
    if tuple(loaded.shape) != tuple(expected):
        raise ValueError(f"has shape {tuple(loaded.shape)} but the model's config implies {tuple(expected)}")


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
        self.checkpoint_sizes = self.full_output_sizes  # each part's rows in the checkpoint
        self.output_sizes = tuple(tp.split(size, "output features") for size in output_sizes)
        self.offsets = tuple(sum(self.output_sizes[:i]) for i in range(len(self.output_sizes)))
        total = sum(self.output_sizes)
        self.weight = _parameter((total, input_size), self._load)
        self.bias = _parameter((total,), self._load) if bias else None

    def _rows(self, part: int) -> tuple[int, int]:
        """(first row, rows) of this rank's slice of part's full output features."""
        size = self.output_sizes[part]
        return self.tp.rank * size, size

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        check_shape(loaded, (self.checkpoint_sizes[part], *param.shape[1:]))
        first, size = self._rows(part)
        param.data.narrow(0, self.offsets[part], size).copy_(loaded.narrow(0, first, size))

    def shard_lora(self, a: torch.Tensor, b: torch.Tensor, part: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's LoRA weights for part: A [r, in] whole, the rows of B [out, r] it computes."""
        first, size = self._rows(part)
        return a, b.narrow(0, first, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q, k, v projection; KV heads are replicated when there are fewer of them than ranks
    (the ranks must then be a multiple of them: `model.check_tensor_parallel`)."""

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
        self.checkpoint_sizes = (num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim)
        self.head_dim = head_dim

    def _rows(self, part: int) -> tuple[int, int]:
        if part == 0 or self.num_kv_replicas == 1:
            return super()._rows(part)
        size = self.output_sizes[part]  # one KV head, shared by num_kv_replicas ranks
        return self.tp.rank // self.num_kv_replicas * size, size


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
        check_shape(loaded, (param.shape[0], self.full_input_size))
        param.data.copy_(loaded.narrow(1, self.tp.rank * self.input_size, self.input_size))

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        check_shape(loaded, param.shape)
        param.data.copy_(loaded)

    def shard_lora(
        self, a: torch.Tensor, b: torch.Tensor, part: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's LoRA weights: the columns of A [r, in] for its input features, B [out, r] whole;
        B (A_rank x_rank) summed over the ranks is B (A x), so the all-reduce completes it."""
        return a.narrow(1, self.tp.rank * self.input_size, self.input_size), b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Partial product only; call `reduce` after adding any other partial terms (e.g. LoRA)."""
        return F.linear(x, self.weight)

    def reduce(self, partial: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1:
            dist.all_reduce(partial)
        return partial if self.bias is None else partial + self.bias


class VocabParallelEmbedding(nn.Module):
    """A vocabulary-sized matrix split by rows: rank r holds tokens [r * S, (r + 1) * S), S = vocab / N
    rounded up (the last rank's extra rows are zero). Serves as the token embedding (each rank looks
    up the tokens it holds, the others add zeros in the all-reduce) and as the LM head (each rank
    scores its tokens; the first rank gathers the pieces). Splitting rather than replicating it keeps
    the weights per rank at 1/N: the embedding is a fifth of SmolLM2 and an eighth of Llama-3-8B."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel) -> None:
        super().__init__()
        self.tp = tp
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // tp.size)
        self.first_row = tp.rank * self.rows_per_rank
        self.weight = _parameter((self.rows_per_rank, hidden_size), self._load)

    def _load(self, param: nn.Parameter, loaded: torch.Tensor, part: int = 0) -> None:
        check_shape(loaded, (self.vocab_size, param.shape[1]))
        held = max(0, min(self.vocab_size - self.first_row, self.rows_per_rank))
        param.data.zero_()
        param.data[:held].copy_(loaded.narrow(0, self.first_row, held))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        """token_ids [T] -> embeddings [T, H], the same on every rank."""
        if self.tp.size == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.first_row
        elsewhere = (local < 0) | (local >= self.rows_per_rank)
        x = F.embedding(local.masked_fill(elsewhere, 0), self.weight)
        x.masked_fill_(elsewhere[:, None], 0)
        dist.all_reduce(x)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [N, H] -> logits [N, vocab] in fp32 on the first rank; None on the others, which only
        send their share."""
        local = F.linear(hidden, self.weight).float()  # [N, rows_per_rank]
        if self.tp.size == 1:
            return local
        pieces = [torch.empty_like(local) for _ in range(self.tp.size)] if self.tp.rank == 0 else None
        dist.gather(local, pieces, dst=0)
        return None if pieces is None else torch.cat(pieces, dim=1)[:, : self.vocab_size]
