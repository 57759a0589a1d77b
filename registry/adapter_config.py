"""An adapter's adapter_config.json (PEFT's LoraConfig) parsed and checked, and the errors every adapter
check raises.

Only plain LoRA is served: A/B deltas on the shared q/k/v/o/gate/up/down projections, scaled as PEFT
scales them (alpha / r, or alpha / sqrt(r) with rslora, each overridable per module by a pattern).
Options that make an adapter more than that are refused, each saying what to train instead.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# init_lora_weights values whose training changed the base weights: the adapter fits those, not ours
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# PEFT options that make an adapter more than A/B deltas on the shared projections, each refused when set
UNSUPPORTED_OPTIONS = {
    "use_dora": "DoRA (use_dora) is not supported; train a plain LoRA with use_dora=False",
    "lora_bias": "lora_bias (a bias on lora_B) is not supported; train with lora_bias=False",
    "modules_to_save": "modules_to_save {value} replace whole modules of the base model that every adapter "
    "shares, which is not supported; train without modules_to_save",
    "trainable_token_indices": "trainable_token_indices (trained embedding rows) is not supported; "
    "train without it",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "layer_replication": "layer_replication changes the base model's layers, which is not supported",
    "target_parameters": "target_parameters (LoRA on raw parameters) is not supported; use target_modules",
    "use_qalora": "QALoRA (use_qalora) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
}


class InvalidAdapter(ValueError):
    """The source is missing, malformed or uses something we do not serve; the message says which."""


class IncompatibleAdapter(ValueError):
    """A well-formed adapter whose shapes or rank do not fit the base model or the shards' limits."""


@dataclass(frozen=True)
class AdapterMetadata:
    rank: int  # the config's r; rank_pattern may give modules others
    alpha: float
    use_rslora: bool
    base_model: str
    checksum: str
    # PEFT's per-module overrides, in the config's order: (pattern, value); a pattern matches a module
    # path such as model.layers.3.self_attn.q_proj when the path ends in it at a "." boundary
    rank_pattern: tuple[tuple[str, int], ...] = ()
    alpha_pattern: tuple[tuple[str, float], ...] = ()
    # (module path, A shape, B shape) per adapted module, from the weights' header (read_metadata)
    module_shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...]], ...] = ()
    # the projection names the weights adapt, in SUPPORTED_TARGETS order (read_metadata)
    target_modules: tuple[str, ...] = ()
    # the config's target_modules as PEFT matches them: a regex fullmatching the module paths it targets
    target_regex: str = ""

    def targets(self, module_path: str) -> bool:
        return re.fullmatch(self.target_regex, module_path) is not None

    @property
    def max_rank(self) -> int:
        """The largest rank any module may have: what a slot must hold."""
        return max([self.rank, *(rank for _, rank in self.rank_pattern)])

    def module_rank(self, module_path: str) -> int:
        return int(pattern_value(self.rank_pattern, module_path, self.rank))

    def module_scaling(self, module_path: str) -> float:
        """PEFT's scaling for the module: alpha / r, or alpha / sqrt(r) with rslora, each from its pattern."""
        rank = self.module_rank(module_path)
        alpha = pattern_value(self.alpha_pattern, module_path, self.alpha)
        return alpha / (rank**0.5 if self.use_rslora else rank)


def pattern_value(patterns: tuple[tuple[str, float], ...], module_path: str, default: float) -> float:
    """The value of the first pattern matching module_path, as PEFT's get_pattern_key picks it."""
    for pattern, value in patterns:
        if re.match(rf"(.*\.)?({pattern})$", module_path):
            return value
    return default


def parse_config(config_bytes: bytes, checksum: str) -> AdapterMetadata:
    try:
        config = json.loads(config_bytes)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {error}") from error
    if not isinstance(config, dict):
        raise InvalidAdapter(
            f"{CONFIG_FILE} must hold a JSON object (PEFT's LoraConfig), not {type(config).__name__}"
        )
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidAdapter(f"peft_type {config.get('peft_type')!r} is not supported; only LORA is")
    _check_plain_lora(config)
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise InvalidAdapter(f"{CONFIG_FILE} needs a positive integer 'r', got {rank!r}")
    alpha = config.get("lora_alpha", rank)
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha < math.inf:
        raise InvalidAdapter(f"{CONFIG_FILE} needs a positive number 'lora_alpha', got {alpha!r}")
    return AdapterMetadata(
        rank=rank,
        alpha=float(alpha),
        use_rslora=bool(config.get("use_rslora", False)),
        base_model=str(config.get("base_model_name_or_path") or ""),
        checksum=checksum,
        rank_pattern=_patterns(config, "rank_pattern", int),
        alpha_pattern=_patterns(config, "alpha_pattern", float),
        target_regex=_target_regex(config.get("target_modules")),
    )


def _check_plain_lora(config: dict) -> None:
    """InvalidAdapter for a config whose adapter is more than plain LoRA on the base model's weights."""
    for key, message in UNSUPPORTED_OPTIONS.items():
        if config.get(key):
            raise InvalidAdapter(message.format(value=config[key]))
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.startswith(BASE_CHANGING_INITS):
        raise InvalidAdapter(
            f"init_lora_weights={init!r} changed the base weights in training, so this adapter does not fit "
            "the original base model; convert it to a plain LoRA with PEFT's save_pretrained(..., "
            "path_initial_model_for_weight_conversion=...) or train with init_lora_weights=True"
        )


def _target_regex(targets: object) -> str:
    """PEFT's target_modules as a regex fullmatching the module paths it targets: a list entry targets a
    path equal to it or ending in "." + it; a string is a regex ("all-linear": every linear layer but
    the output head). Which projections are adapted is read from the weights (read_metadata)."""
    if targets == "all-linear":
        targets = list(SUPPORTED_TARGETS)
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as error:
            raise InvalidAdapter(
                f"target_modules {targets!r} is not a valid regular expression: {error}"
            ) from error
        return targets
    if not isinstance(targets, list | tuple) or not targets or not all(isinstance(t, str) for t in targets):
        raise InvalidAdapter(
            f"target_modules must be a non-empty list of module names or a regex, got {str(targets)[:200]}"
        )
    unsupported = sorted(target for target in targets if target.rsplit(".", 1)[-1] not in SUPPORTED_TARGETS)
    if unsupported:
        shown = unsupported[:5] + ([f"... ({len(unsupported)} in all)"] if len(unsupported) > 5 else [])
        raise InvalidAdapter(
            f"target_modules {shown} are not supported; LoRA may target {list(SUPPORTED_TARGETS)}"
        )
    return r"(.*\.)?(" + "|".join(re.escape(target) for target in sorted(set(targets))) + ")"


def _patterns(config: dict, key: str, kind: type) -> tuple[tuple[str, float], ...]:
    """config[key] (PEFT's {module pattern: value}) checked: regex keys, positive values of kind."""
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        raise InvalidAdapter(f"{key} must map module patterns to values, got {patterns!r}")
    checked = []
    for pattern, value in patterns.items():
        number_ok = isinstance(value, int) if kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not number_ok or value <= 0:
            raise InvalidAdapter(f"{key}[{pattern!r}] must be a positive {kind.__name__}, got {value!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise InvalidAdapter(
                f"{key} key {pattern!r} is not a valid regular expression: {error}"
            ) from error
        checked.append((pattern, kind(value)))
    return tuple(checked)
