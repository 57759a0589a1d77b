"""Tiny random Llama-family models written as safetensors, for fast tests of every code path."""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)


def write_tiny_model(
    out_dir: Path,
    tokenizer_dir: Path,
    *,
    family: str = "llama",
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_context: int = 512,
    seed: int = 0,
    **config_overrides: object,
) -> Path:
    """Write a random-weight model of the given family with tokenizer_dir's tokenizer into out_dir.

    family is "llama" (tied embeddings, like SmolLM2), "qwen2" (q/k/v bias) or "mistral";
    config_overrides go to the config as they are (e.g. sliding_window, rope_parameters, a vocab_size
    larger than the tokenizer's).
    """
    import json

    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    vocab_size = int(config_overrides.pop("vocab_size", 0)) or _tokenizer_vocab_size(  # type: ignore[call-overload]
        json.loads((tokenizer_dir / "tokenizer.json").read_text())
    )
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_context,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        **config_overrides,
    )
    configs = {
        "llama": lambda: LlamaConfig(**{"tie_word_embeddings": True, **common}),
        "qwen2": lambda: Qwen2Config(**{"tie_word_embeddings": False, **common}),
        "mistral": lambda: MistralConfig(**{"tie_word_embeddings": False, "sliding_window": None, **common}),
    }
    if family not in configs:
        raise ValueError(f"unknown family {family!r}; choose one of {sorted(configs)}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(configs[family](), dtype=torch.float32)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    return out_dir


def _tokenizer_vocab_size(tokenizer_json: dict) -> int:
    """Room for every id the tokenizer can produce: the model's vocabulary and the added tokens, which
    some tokenizers (Llama 3's specials) number past it."""
    ids = list(tokenizer_json["model"]["vocab"].values())
    ids += [token["id"] for token in tokenizer_json.get("added_tokens", [])]
    return max(ids) + 1
