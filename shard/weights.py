"""Load Hugging Face safetensors checkpoints into our model, one tensor at a time.

Checkpoint names map onto our modules; the fused projections (qkv, gate_up) take each part from its
own checkpoint tensor, and every parameter's `weight_loader` keeps this rank's slice.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loraplex.shard.model import LlamaModel
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.parallel import TensorParallel

# checkpoint module name -> (our fused module, part index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Fill every parameter of `model` from the *.safetensors files in model_dir; fail on any tensor the
    model does not expect and on any parameter the checkpoint leaves unset."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    params = dict(model.named_parameters())
    loaded: dict[str, set[int | None]] = {}
    for file in files:
        with safe_open(file, framework="pt") as checkpoint:
            for name in checkpoint.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                target, part = _our_name(name)
                if target not in params:
                    raise ValueError(f"{file.name}: tensor {name!r} has no place in the model")
                param = params[target]
                tensor = checkpoint.get_tensor(name).to(param.dtype)
                loader = getattr(param, "weight_loader", None)
                if loader is None:
                    param.data.copy_(tensor)
                else:
                    loader(param, tensor, part or 0)
                loaded.setdefault(target, set()).add(part)
    missing = [name for name in params if len(loaded.get(name, ())) < _num_parts(name)]
    if missing:
        raise ValueError(f"the checkpoint in {model_dir} lacks weights for {missing[:5]}")


def _num_parts(name: str) -> int:
    return max(1, sum(1 for fused, _ in _FUSED.values() if f".{fused}." in name))


def _our_name(name: str) -> tuple[str, int | None]:
    name = name.removeprefix("model.")
    module, _, leaf = name.rpartition(".")
    parent, _, last = module.rpartition(".")
    if last in _FUSED:
        fused, part = _FUSED[last]
        return f"{parent}.{fused}.{leaf}", part
    return name, None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def model_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """`auto` is fp32 on CPU (half-precision matmuls are slow there, and fp32 matches the reference
    tightly) and bf16 on GPUs; otherwise one of DTYPES."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; choose auto or one of {sorted(DTYPES)}")
    return DTYPES[name]


def build_model(
    config: ModelConfig,
    model_dir: Path,
    device: torch.device,
    dtype: torch.dtype,
    tp: TensorParallel | None = None,
) -> LlamaModel:
    """Construct the model (this rank's slice of it) directly on `device` in its serving dtype and
    load the checkpoint."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaModel(config, tp)
    finally:
        torch.set_default_dtype(previous)
    model.inv_freq = model.inv_freq.float()
    load_weights(model, model_dir)
    return model.eval()
