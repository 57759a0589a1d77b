"""Random-weight LoRA adapters in PEFT's on-disk format, for benchmarks and tests that need many real
adapter sources (the trained demo adapters in demo-adapters/ are few and slow to make)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from loraplex.registry.adapter_config import pattern_value

PROJECTIONS = {  # module -> (in features, out features) as functions of (hidden, intermediate, kv dim)
    "q_proj": lambda h, i, kv: (h, h),
    "k_proj": lambda h, i, kv: (h, kv),
    "v_proj": lambda h, i, kv: (h, kv),
    "o_proj": lambda h, i, kv: (h, h),
    "gate_proj": lambda h, i, kv: (h, i),
    "up_proj": lambda h, i, kv: (h, i),
    "down_proj": lambda h, i, kv: (i, h),
}


def write_peft_adapter(
    out_dir: Path,
    model_dir: Path,
    *,
    rank: int = 8,
    alpha: float = 16,
    targets: tuple[str, ...] = ("q_proj", "v_proj"),
    seed: int = 0,
    scale: float = 0.01,
    use_rslora: bool = False,
    dtype: torch.dtype = torch.float32,
    rank_pattern: dict[str, int] | None = None,
    alpha_pattern: dict[str, float] | None = None,
) -> Path:
    """Random A and B for the model in model_dir (PEFT zero-initialises B; a random B makes the adapter
    change the output, so a wrong or missing delta shows). rank_pattern / alpha_pattern: PEFT's per-module
    overrides, written to the config (each module's tensors get the rank its pattern gives)."""
    ranks = tuple((rank_pattern or {}).items())
    config = json.loads((model_dir / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    kv_dim = head_dim * config["num_key_value_heads"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for target in targets:
            fan_in, fan_out = PROJECTIONS[target](hidden, inter, kv_dim)
            group = "self_attn" if target in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            module = f"model.layers.{layer}.{group}.{target}"
            prefix = f"base_model.model.{module}"
            module_rank = int(pattern_value(ranks, module, rank))
            a = torch.randn(module_rank, fan_in, generator=generator) * scale
            b = torch.randn(fan_out, module_rank, generator=generator) * scale
            tensors[f"{prefix}.lora_A.weight"] = a.to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = b.to(dtype)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out_dir / "adapter_model.safetensors")
    (out_dir / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "r": rank,
                "lora_alpha": alpha,
                "target_modules": list(targets),
                "use_rslora": use_rslora,
                "base_model_name_or_path": model_dir.name,
                "rank_pattern": rank_pattern or {},
                "alpha_pattern": alpha_pattern or {},
            }
        )
    )
    return out_dir
