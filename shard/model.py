"""Our Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2), written tensor-parallel-ready.

The model computes hidden states for a flat batch of tokens from many sequences (prefill chunks and
decode steps mixed); attention reads and writes the paged KV cache through `AttentionMetadata`, and
every projection LoRA can target (q, k, v, o, gate, up, down) adds the batch's per-token adapter deltas
through a `LoraDeltas` (one call per fused projection: qkv_proj, o_proj, gate_up_proj, down_proj).
Tensor shapes: T = tokens in the step, H = hidden size, h/kv = heads on this rank.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from loraplex.registry.adapter_weights import ModelFit
from loraplex.shard.attention import AttentionMetadata, paged_attention
from loraplex.shard.lora import LoraAdapter
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.parallel import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    TensorParallel,
    VocabParallelEmbedding,
)


class LoraDeltas(Protocol):
    """Adds out += scaling * B(A x) for each token's adapter (tokens with no adapter are left alone), for
    every module of the fused projection the adapter targets; `lora_layout` says where each module's
    output columns are."""

    def add(self, layer: int, projection: str, x: torch.Tensor, out: torch.Tensor) -> None: ...


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the half-split layout Hugging Face checkpoints use. x: [T, heads, D]."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


LORA_MODULES = {  # fused projection -> the Hugging Face modules it computes, in output column order
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}
# Hugging Face module -> (fused projection, its part in the fused output)
_FUSED_PART = {
    module: (fused, part) for fused, modules in LORA_MODULES.items() for part, module in enumerate(modules)
}


def _project(
    linear: ColumnParallelLinear | RowParallelLinear, name: str, layer: int, x, lora: LoraDeltas | None
) -> torch.Tensor:
    out = linear(x)
    if lora is not None:
        lora.add(layer, name, x, out)
    return out


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer = layer
        self.head_dim = config.head_dim
        self.num_heads = tp.split(config.num_heads, "attention heads")
        self.num_kv_heads = max(1, config.num_kv_heads // tp.size)
        self.sliding_window = config.sliding_window
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads, config.qkv_bias, tp
        )
        self.o_proj = RowParallelLinear(
            config.num_heads * config.head_dim, config.hidden_size, config.o_bias, tp
        )
        self.k_cache = torch.empty(0)  # [num_blocks, block_size, kv, D], set by the KV cache
        self.v_cache = torch.empty(0)

    def forward(self, x, cos, sin, attn: AttentionMetadata, lora: LoraDeltas | None) -> torch.Tensor:
        qkv = _project(self.qkv_proj, "qkv_proj", self.layer, x, lora)
        q_size, kv_size, _ = self.qkv_proj.output_sizes
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = rotate(q.view(-1, self.num_heads, self.head_dim), cos, sin)  # [T, h, D]
        k = rotate(k.view(-1, self.num_kv_heads, self.head_dim), cos, sin)  # [T, kv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = paged_attention(q, k, v, self.k_cache, self.v_cache, attn)  # [T, h * D]
        partial = _project(self.o_proj, "o_proj", self.layer, out, lora)  # LoRA joins the reduce
        return self.o_proj.reduce(partial)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.layer = layer
        size = config.intermediate_size
        self.gate_up_proj = ColumnParallelLinear(config.hidden_size, (size, size), config.mlp_bias, tp)
        self.down_proj = RowParallelLinear(size, config.hidden_size, config.mlp_bias, tp)

    def forward(self, x: torch.Tensor, lora: LoraDeltas | None) -> torch.Tensor:
        gate_up = _project(self.gate_up_proj, "gate_up_proj", self.layer, x, lora)
        gate, up = gate_up.chunk(2, dim=-1)
        hidden = F.silu(gate) * up  # [T, intermediate / tp]
        partial = _project(self.down_proj, "down_proj", self.layer, hidden, lora)
        return self.down_proj.reduce(partial)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, layer, tp)

    def forward(self, x, cos, sin, attn: AttentionMetadata, lora: LoraDeltas | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


def check_tensor_parallel(config: ModelConfig, size: int) -> None:
    """Refuse, before any rank starts, a size the model cannot be split into."""
    if size < 1:
        raise ValueError(f"the tensor-parallel size must be at least 1, got {size}")
    problems = [
        f"{what} ({total})"
        for what, total in (
            ("attention heads", config.num_heads),
            ("MLP width", config.intermediate_size),
        )
        if total % size
    ]
    if config.num_kv_heads % size and size % config.num_kv_heads:
        problems.append(f"KV heads ({config.num_kv_heads}; or a size that is a multiple of them)")
    if problems:
        raise ValueError(
            f"{config.model_type} cannot be split over {size} tensor-parallel ranks: "
            f"{', '.join(problems)} must divide by it"
        )


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.tp = tp = tp or TensorParallel()
        check_tensor_parallel(config, tp.size)
        self.config = config
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Split by vocabulary like the embedding: logits are computed only for the rows being sampled,
        # so gathering them costs little next to holding the whole head on every rank.
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else VocabParallelEmbedding(config.vocab_size, config.hidden_size, tp)
        )
        inv_freq, self.rope_scaling = config.rope_inv_freq()
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self,
        token_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        lora: LoraDeltas | None = None,
    ) -> torch.Tensor:
        """token_ids, positions: [T] -> hidden states [T, H] after the final norm."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [T, 1, D]
        x = self.embed_tokens(token_ids)
        cos = (angles.cos() * self.rope_scaling).to(x.dtype)
        sin = (angles.sin() * self.rope_scaling).to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, attn, lora)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden: [N, H] -> logits [N, vocab] in fp32 on the first rank (None on the others)."""
        head = self.embed_tokens if self.lm_head is None else self.lm_head
        return head.logits(hidden)

    def _fused_linears(self) -> dict[str, ColumnParallelLinear | RowParallelLinear]:
        first = self.layers[0]  # every layer is split the same way
        return {
            "qkv_proj": first.self_attn.qkv_proj,
            "o_proj": first.self_attn.o_proj,
            "gate_up_proj": first.mlp.gate_up_proj,
            "down_proj": first.mlp.down_proj,
        }

    def lora_layout(self) -> dict[str, tuple[tuple[str, int, int], ...]]:
        """Per fused projection, its modules as (name, first output column, columns) on this rank."""
        linears = self._fused_linears()
        return {
            projection: tuple(
                zip(modules, linears[projection].offsets, linears[projection].output_sizes, strict=True)
            )
            for projection, modules in LORA_MODULES.items()
        }

    def lora_shard_shapes(self) -> dict[str, tuple[int, int]]:
        """Per Hugging Face module name, the (in, out) features of this rank's slice of it: the shapes
        of this rank's LoRA A and B (see `shard_adapter`)."""
        linears = self._fused_linears()
        shapes = {}
        for module, (fused, part) in _FUSED_PART.items():
            linear = linears[fused]
            in_features = linear.weight.shape[1]
            shapes[module] = (in_features, linear.output_sizes[part])
        return shapes

    def shard_adapter(self, adapter: LoraAdapter) -> LoraAdapter:
        """This rank's slice of an adapter, cut as its layers are (the adapter itself at TP=1); the
        copy keeps the adapter's uid, so both name the same loaded adapter."""
        if self.tp.size == 1:
            return adapter
        linears = self._fused_linears()
        layers = []
        for modules in adapter.layers:
            sliced = {}
            for module, (a, b) in modules.items():
                fused, part = _FUSED_PART[module]
                a_rank, b_rank = linears[fused].shard_lora(a, b, part)
                sliced[module] = (a_rank.clone(), b_rank.clone())  # copies: views would keep the whole alive
            layers.append(sliced)
        return replace(adapter, layers=tuple(layers))

    def lora_targets(self) -> dict[str, tuple[int, int]]:
        """Every projection an adapter may target, by its Hugging Face module path -> (in, out) features
        of the full (unsplit) layer; adapters are validated against these shapes."""
        return ModelFit.per_layer(self.lora_features(), self.config.num_layers).targets

    def lora_features(self) -> dict[str, tuple[int, int]]:
        """One layer's targetable projections ("self_attn.q_proj") -> (in, out) features, the same in
        every layer: what the shard publishes so that routers can fit adapters before registering them."""
        config = self.config
        q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        return {
            "self_attn.q_proj": (config.hidden_size, q_out),
            "self_attn.k_proj": (config.hidden_size, kv_out),
            "self_attn.v_proj": (config.hidden_size, kv_out),
            "self_attn.o_proj": (q_out, config.hidden_size),
            "mlp.gate_proj": (config.hidden_size, config.intermediate_size),
            "mlp.up_proj": (config.hidden_size, config.intermediate_size),
            "mlp.down_proj": (config.intermediate_size, config.hidden_size),
        }
