"""The architecture facts our Llama-family model needs, read once from a Hugging Face config."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import AutoConfig, PretrainedConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
# RoPE variants whose frequencies do not depend on the sequence length, so one table serves all steps.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
SILU_NAMES = ("silu", "swish")  # transformers' ACT2FN maps both to SiLU


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v; Llama may set attention_bias for all four
    o_bias: bool
    mlp_bias: bool
    sliding_window: int | None  # Mistral: attend to at most this many previous positions
    eos_token_ids: tuple[int, ...]
    hf_config: PretrainedConfig  # kept for the RoPE tables, which transformers computes for us

    @classmethod
    def from_dir(cls, model_dir: Path) -> ModelConfig:
        """Also reads generation_config.json, whose eos_token_id (what transformers' generate stops at)
        may list more ids than config.json's, e.g. Llama-3-Instruct's end-of-turn token."""
        config = cls.from_hf(AutoConfig.from_pretrained(model_dir))
        generation = model_dir / "generation_config.json"
        if not generation.is_file():
            return config
        extra = _token_ids(json.loads(generation.read_text()).get("eos_token_id"))
        eos = config.eos_token_ids + tuple(i for i in extra if i not in config.eos_token_ids)
        return replace(config, eos_token_ids=eos)

    @classmethod
    def from_hf(cls, config: PretrainedConfig) -> ModelConfig:
        if config.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {config.model_type!r} is not supported; loraplex serves {SUPPORTED_MODEL_TYPES}"
            )
        hidden_act = getattr(config, "hidden_act", "silu")
        if hidden_act not in SILU_NAMES:
            raise ValueError(f"hidden_act {hidden_act!r} is not supported; Llama-family models use silu")
        num_heads = config.num_attention_heads
        # Only transformers' Llama reads these two; Mistral and Qwen2 fix their biases whatever they say.
        is_llama = config.model_type == "llama"
        attention_bias = is_llama and bool(getattr(config, "attention_bias", False))
        mlp_bias = is_llama and bool(getattr(config, "mlp_bias", False))
        return cls(
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // num_heads,
            rms_norm_eps=config.rms_norm_eps,
            max_position_embeddings=config.max_position_embeddings,
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=config.model_type == "qwen2" or attention_bias,
            o_bias=attention_bias,
            mlp_bias=mlp_bias,
            sliding_window=_sliding_window(config),
            eos_token_ids=_token_ids(config.eos_token_id),
            hf_config=config,
        )

    def rope_inv_freq(self) -> tuple[torch.Tensor, float]:
        """Inverse frequencies [head_dim // 2] and the cos/sin scaling factor, as transformers computes them."""
        parameters = dict(getattr(self.hf_config, "rope_parameters", None) or {})
        rope_type = parameters.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise ValueError(f"rope_type {rope_type!r} is not supported; loraplex serves {STATIC_ROPE_TYPES}")
        if rope_type == "default":
            theta = float(parameters.get("rope_theta", getattr(self.hf_config, "rope_theta", 10000.0)))
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
            return 1.0 / theta**exponents, 1.0
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](self.hf_config, torch.device("cpu"))
        if inv_freq.numel() != self.head_dim // 2:  # transformers' Llama rotates whole heads, and fails too
            raise ValueError(
                f"rope_type {rope_type!r} rotates {2 * inv_freq.numel()} of the {self.head_dim} dimensions "
                "of each head (partial_rotary_factor); loraplex serves RoPE over whole heads"
            )
        return inv_freq.float(), float(scaling)

    def kv_bytes_per_token(self, dtype: torch.dtype, tp_size: int = 1) -> int:
        """Bytes of K and V that one token occupies across all layers on one tensor-parallel rank."""
        kv_heads_per_rank = max(1, self.num_kv_heads // tp_size)
        return 2 * self.num_layers * kv_heads_per_rank * self.head_dim * dtype.itemsize


def _sliding_window(config: PretrainedConfig) -> int | None:
    """The attention window every layer uses, or None for full attention. Mistral windows every layer,
    Llama none; Qwen2 windows only the layers from max_window_layers on (its `layer_types`), and only
    with use_sliding_window."""
    window = getattr(config, "sliding_window", None)
    if config.model_type == "llama":  # transformers' Llama attends to everything whatever config.json says
        return None
    if config.model_type == "qwen2" and not getattr(config, "use_sliding_window", False):
        return None
    layer_types = getattr(config, "layer_types", None)
    if window is None or layer_types is None:
        return window
    windowed = [kind == "sliding_attention" for kind in layer_types]
    if not any(windowed):
        return None
    if not all(windowed):
        first = windowed.index(True)
        raise ValueError(
            f"{config.model_type} uses a sliding window of {window} in layer {first} but full attention in "
            "others (see use_sliding_window, max_window_layers, layer_types); loraplex serves models "
            "whose layers all attend alike"
        )
    return window


def _token_ids(value: int | list[int] | None) -> tuple[int, ...]:
    return tuple(value if isinstance(value, list) else [] if value is None else [value])
