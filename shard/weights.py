"""Load Hugging Face safetensors checkpoints into our model, one tensor at a time.

Checkpoint names map onto our modules; the fused projections (qkv, gate_up) take each part from its
own checkpoint tensor, and every parameter's `weight_loader` keeps this rank's slice.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loraplex.shard.model import LlamaModel
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.parallel import TensorParallel, check_shape

# checkpoint module name -> (our fused module, part index)
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
_UNFUSED = {target: module for module, target in _FUSED.items()}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def load_weights(model: LlamaModel, model_dir: Path) -> None:
    """Fill every parameter of `model` from model_dir's safetensors (the files its index names, if it
    has one); fail, naming the tensors, on any the model does not expect, any whose shape the config
    does not imply, and any the checkpoint leaves unset."""
    params = dict(model.named_parameters())
    tied_head: torch.Tensor | None = None  # a tied model's head is its embedding; some store a copy
    loaded: dict[str, set[int | None]] = {}
    for file in checkpoint_files(model_dir):
        with safe_open(file, framework="pt") as checkpoint:
            for name in checkpoint.keys():  # noqa: SIM118 (safe_open is not iterable)
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name == "lm_head.weight" and model.lm_head is None:
                    tied_head = checkpoint.get_tensor(name)
                    continue
                target, part = _our_name(name)
                if target not in params:
                    raise ValueError(f"{file.name}: tensor {name!r} has no place in the model")
                try:
                    _load(params[target], checkpoint.get_tensor(name), part)
                except ValueError as error:
                    raise ValueError(f"{file.name}: tensor {name!r} {error}") from None
                loaded.setdefault(target, set()).add(part)
    missing = [
        _checkpoint_name(target, part)
        for target in params
        for part in _parts(target)
        if part not in loaded.get(target, ())
    ]
    if missing:
        raise ValueError(
            f"the checkpoint in {model_dir} lacks {len(missing)} tensors the model needs: {missing[:5]}"
        )
    if tied_head is not None:
        _check_tied_head(params["embed_tokens.weight"], tied_head)


def _check_tied_head(embedding: nn.Parameter, head: torch.Tensor) -> None:
    """A stored head that differs from the embedding is one transformers leaves untied: refuse it
    rather than serve the embedding in its place."""
    ours = nn.Parameter(torch.empty_like(embedding), requires_grad=False)
    try:
        embedding.weight_loader(ours, head.to(embedding.dtype), 0)  # type: ignore[attr-defined]
    except ValueError as error:
        raise ValueError(f"tensor 'lm_head.weight' {error}") from None
    if not torch.equal(ours, embedding):
        raise ValueError(
            "the checkpoint's lm_head.weight differs from model.embed_tokens.weight although "
            "tie_word_embeddings is true (transformers would leave them untied); set "
            "tie_word_embeddings to false in config.json"
        )


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of the checkpoint: those its index names, or else model.safetensors, or
    else every one in the directory (the index and model.safetensors leave out other copies some
    repositories ship, e.g. consolidated.safetensors, as transformers does)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [
            model_dir / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
        absent = [file.name for file in files if not file.is_file()]
        if absent:
            raise FileNotFoundError(f"{index.name} names files missing from {model_dir}: {absent}")
        return files
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
    return files


def _load(param: nn.Parameter, tensor: torch.Tensor, part: int | None) -> None:
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        loader(param, tensor.to(param.dtype), part or 0)
        return
    check_shape(tensor, param.shape)
    param.data.copy_(tensor)


def _parts(name: str) -> tuple[int | None, ...]:
    """The checkpoint parts a parameter is loaded from: one per module of a fused projection."""
    module = name.rsplit(".", 2)[-2]
    num_parts = sum(1 for fused, _ in _FUSED.values() if fused == module)
    return tuple(range(num_parts)) if num_parts else (None,)


def _checkpoint_name(name: str, part: int | None) -> str:
    """Our parameter (and part) -> the Hugging Face checkpoint tensor it comes from."""
    if part is not None:
        parent, fused, leaf = name.rsplit(".", 2)
        name = f"{parent}.{_UNFUSED[fused, part]}.{leaf}"
    return name if name.startswith("lm_head.") else f"model.{name}"


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
