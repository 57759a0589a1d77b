"""An adapter's adapter_model.safetensors checked without reading its tensors: the header's shapes against
the config (`lora_modules`), then against the base model (`check_fit`).

The header layout (the safetensors format): an 8-byte little-endian length N, N bytes of JSON mapping
each tensor to {dtype, shape, data_offsets}, then the data, which the offsets tile exactly.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from loraplex.registry.adapter_config import (
    SUPPORTED_TARGETS,
    WEIGHTS_FILE,
    AdapterMetadata,
    IncompatibleAdapter,
    InvalidAdapter,
)

PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")
SAVE_HINT = "save a plain LoRA (only lora_A/lora_B weights) with PEFT's save_pretrained"
MAX_HEADER_BYTES = 100 << 20  # what the safetensors library itself accepts
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


@dataclass(frozen=True)
class ModelFit:
    """What an adapter must fit: every targetable module path -> (in, out) features of the full layer,
    and the largest rank a slot takes (0: unknown, not checked)."""

    targets: Mapping[str, tuple[int, int]]
    max_rank: int = 0
    limit_name: str = "this shard's --max-lora-rank"  # how messages name max_rank

    @classmethod
    def per_layer(cls, features: Mapping[str, tuple[int, int]], num_layers: int, **limits) -> ModelFit:
        """From one layer's features ("self_attn.q_proj" -> (in, out)), the same in every layer."""
        targets = {
            f"model.layers.{layer}.{name}": shape
            for layer in range(num_layers)
            for name, shape in features.items()
        }
        return cls(targets, **limits)


def check_fit(module_shapes: Mapping[str, tuple[Sequence[int], Sequence[int]]], fit: ModelFit) -> None:
    """IncompatibleAdapter unless every module (path -> A shape, B shape, ranks already checked against
    the config by lora_modules) exists in the model at its features, within the rank limit."""
    largest = max((a[0] for a, _ in module_shapes.values()), default=0)
    if fit.max_rank and largest > fit.max_rank:
        raise IncompatibleAdapter(f"adapter rank {largest} exceeds {fit.limit_name} {fit.max_rank}")
    for path, (a, b) in module_shapes.items():
        if path not in fit.targets:
            raise IncompatibleAdapter(f"the base model has no LoRA-targetable projection {path}")
        in_features, out_features = fit.targets[path]
        expected_a, expected_b = (a[0], in_features), (out_features, a[0])
        if tuple(a) != expected_a or tuple(b) != expected_b:
            raise IncompatibleAdapter(
                f"{path}: lora_A {tuple(a)} / lora_B {tuple(b)} do not fit the base model, "
                f"which needs {expected_a} / {expected_b}"
            )


def header_shapes(stream: BinaryIO, num_bytes: int) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from a safetensors file of num_bytes read from stream, once the header
    parses and its offsets tile the rest of the file exactly (what a truncated or foreign file fails)."""
    bad = f"{WEIGHTS_FILE} is not a valid safetensors file"
    prefix = stream.read(8)
    if len(prefix) < 8:
        raise InvalidAdapter(f"{bad}: {num_bytes} bytes is shorter than its header")
    (header_bytes,) = struct.unpack("<Q", prefix)
    if header_bytes > min(MAX_HEADER_BYTES, num_bytes - 8):
        raise InvalidAdapter(f"{bad}: its header claims {header_bytes} bytes of a {num_bytes}-byte file")
    try:
        header = json.loads(stream.read(header_bytes))
        entries = {key: value for key, value in header.items() if key != "__metadata__"}
        spans, shapes = [], {}
        for key, entry in entries.items():
            shape = tuple(int(size) for size in entry["shape"])
            begin, end = (int(offset) for offset in entry["data_offsets"])
            if end - begin != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
                raise InvalidAdapter(f"{bad}: {key} spans {end - begin} bytes, not its shape's")
            spans.append((begin, end))
            shapes[key] = shape
    except InvalidAdapter:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InvalidAdapter(f"{bad}: its header does not parse ({error!r})") from error
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise InvalidAdapter(f"{bad}: its tensors overlap or leave gaps")
        position = end
    if 8 + header_bytes + position != num_bytes:
        raise InvalidAdapter(
            f"{bad}: the header accounts for {8 + header_bytes + position} of {num_bytes} bytes"
        )
    return shapes


def _unexpected_tensor(key: str) -> str:
    """What is wrong with a tensor that is no LoRA A/B weight, and what to do."""
    if "lora_magnitude_vector" in key:
        return f"tensor {key!r} is a DoRA magnitude: DoRA is not supported; train with use_dora=False"
    if re.search(r"\.lora_[AB](\.[^.]+)?\.bias$", key):
        return f"tensor {key!r} is a LoRA bias: lora_bias is not supported; train with lora_bias=False"
    if re.search(r"\.lora_(embedding_)?[AB](\.[^.]+)?\.weight$", key):
        if not key.startswith("base_model.model."):
            return f"tensor {key!r} lacks PEFT's 'base_model.model.' prefix; {SAVE_HINT}"
        return f"tensor {key!r} is LoRA on an embedding, which is not supported"
    return (
        f"unexpected tensor {key!r}: only LoRA A/B weights are supported (a full weight or bias comes from "
        f"modules_to_save, save_embedding_layers, trainable tokens or bias != 'none'); {SAVE_HINT}, "
        "save_embedding_layers=False and bias='none'"
    )


def lora_modules(
    shapes: Mapping[str, Sequence[int]], metadata: AdapterMetadata
) -> dict[str, tuple[str, str]]:
    """Module path -> the keys of its (A, B) tensors, given every tensor's shape: each module one of the
    config's targets with both halves, 2-D, at the rank the config gives it (r, or its rank_pattern)."""
    halves: dict[str, dict[str, str]] = {}
    for key in shapes:
        match = PEFT_KEY.match(key)
        if not match:
            raise InvalidAdapter(_unexpected_tensor(key))
        halves.setdefault(match["module"], {})[match["half"]] = key
    if not halves:
        raise InvalidAdapter("the adapter holds no LoRA weights")
    modules = {}
    for path, pair in halves.items():
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(f"{path} needs both lora_A and lora_B weights")
        if path.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS:
            raise InvalidAdapter(
                f"{path} is not a supported target; LoRA may target {list(SUPPORTED_TARGETS)}"
            )
        if not metadata.targets(path):
            raise InvalidAdapter(f"{path} is not among the modules the adapter's target_modules name")
        a, b = tuple(shapes[pair["A"]]), tuple(shapes[pair["B"]])
        rank = metadata.module_rank(path)
        if len(a) != 2 or len(b) != 2 or a[0] != rank or b[1] != rank:
            raise InvalidAdapter(
                f"{path}: lora_A {a} / lora_B {b} are not of rank {rank}, which adapter_config.json gives it"
            )
        modules[path] = (pair["A"], pair["B"])
    return modules
