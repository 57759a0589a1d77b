"""Reading an adapter's metadata from its source, without loading weights.

A source is a local path or a file:// URI naming a PEFT directory (adapter_config.json +
adapter_model.safetensors) or a .tar.gz holding those two files at its root. Besides the config, the
weights' safetensors header is read and checked against it (`lora_modules`): which modules carry LoRA
A/B pairs, at which ranks. The router runs this before an adapter enters the catalogue, no tensor read;
the shard runs the same check on the loaded tensors, then checks the shapes against its own model.

The header layout (the safetensors format): an 8-byte little-endian length N, N bytes of JSON mapping
each tensor to {dtype, shape, data_offsets}, then the data, which the offsets tile exactly.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import re
import struct
import tarfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlparse

from loraplex.registry.records import AdapterRecord

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MAX_WEIGHTS_BYTES = 2 << 30  # an adapter's weights past 2 GiB are refused before being read
MAX_CONFIG_BYTES = 1 << 20  # so is an adapter_config.json past 1 MiB (PEFT writes about 1 KiB)
MAX_ARCHIVE_MEMBERS = 64  # an adapter archive holds two files (and perhaps a README): more is refused
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SUPPORTED_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<half>[AB])(?:\.[^.]+)?\.weight$")
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
PACK_HINT = (
    "pack it with: tar -czf adapter.tar.gz -C ADAPTER_DIR adapter_config.json adapter_model.safetensors"
)
SAVE_HINT = "save a plain LoRA (only lora_A/lora_B weights) with PEFT's save_pretrained"
MAX_HEADER_BYTES = 100 << 20  # what the safetensors library itself accepts
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}  # fmt: skip


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


def catalogue_record(name: str, source: str, base_model: str, fit: ModelFit | None = None) -> AdapterRecord:
    """The catalogue entry for a new adapter: its name checked, its source read (blocking I/O) and, given
    the model it is for, its shapes fitted to it. InvalidAdapter or IncompatibleAdapter name the problem."""
    validate_name(name)
    metadata = read_metadata(source)
    if fit is not None:
        check_fit({path: (a, b) for path, a, b in metadata.module_shapes}, fit)
    return AdapterRecord(
        name=name,
        base_model=base_model,
        source=source,
        rank=metadata.max_rank,
        alpha=metadata.alpha,
        target_modules=metadata.target_modules,
        checksum=metadata.checksum,
    )


def validate_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):  # match's $ would let a trailing newline through
        # a name quoted whole could outgrow what a gRPC status message may carry (16 KiB of metadata)
        shown = repr(name) if len(name) <= 140 else f"{name[:40]!r}... ({len(name)} characters)"
        raise InvalidAdapter(
            f"adapter name {shown} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


def local_path(source: str) -> Path:
    """The filesystem path a source names; other schemes are refused until configured."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "":
        return Path(source).expanduser()
    raise InvalidAdapter(f"source scheme {parsed.scheme!r} is not enabled; use a local path or file://")


def read_metadata(source: str) -> AdapterMetadata:
    """The adapter's config and weights checksum, streaming the weights rather than holding them; the
    weights' header is checked against the config."""
    path = _adapter_path(source)
    if path.is_dir():
        config_bytes = _read_config(path / CONFIG_FILE)
        weights = _require_file(path / WEIGHTS_FILE)
        _check_size(weights.stat().st_size)
        with open(weights, "rb") as handle:
            shapes = header_shapes(handle, weights.stat().st_size)
        weights_digest = _sha256_file(weights)
    else:
        config_bytes, shapes, weights_digest = _read_archive(path)
    metadata = _parse_config(config_bytes, weights_digest)
    modules = lora_modules(shapes, metadata)
    names = {path.rsplit(".", 1)[-1] for path in modules}
    return replace(
        metadata,
        target_modules=tuple(name for name in SUPPORTED_TARGETS if name in names),
        module_shapes=tuple((path, shapes[a], shapes[b]) for path, (a, b) in modules.items()),
    )


def read_adapter(source: str) -> tuple[AdapterMetadata, bytes]:
    """The adapter's config and its adapter_model.safetensors bytes, each read once, from the directory
    or straight out of the archive (nothing is extracted to disk, so archive paths can never escape)."""
    config_bytes, weights = read_adapter_files(source)
    return _parse_config(config_bytes, hashlib.sha256(weights).hexdigest()), weights


def read_adapter_files(source: str) -> tuple[bytes, bytes]:
    """The raw adapter_config.json and adapter_model.safetensors bytes (validated as read_adapter does)."""
    path = _adapter_path(source)
    if path.is_dir():
        config_bytes = _read_config(path / CONFIG_FILE)
        weights_file = _require_file(path / WEIGHTS_FILE)
        _check_size(weights_file.stat().st_size)
        weights = weights_file.read_bytes()
    else:
        with _open_archive(path) as archive:
            members = _archive_members(archive, path)
            config_bytes = _read_archived_config(archive, members[CONFIG_FILE])
            _check_size(members[WEIGHTS_FILE].size)
            weights = archive.extractfile(members[WEIGHTS_FILE]).read()
    _parse_config(config_bytes, "")  # a bad config fails here, before anything is cached
    return config_bytes, weights


def _adapter_path(source: str) -> Path:
    """The source's path, which must be a directory or a .tar.gz archive."""
    path = local_path(source)
    if path.is_dir() or (path.is_file() and path.name.endswith((".tar.gz", ".tgz"))):
        return path
    if path.exists():
        raise InvalidAdapter(f"{path} is neither a PEFT directory nor a .tar.gz archive")
    raise InvalidAdapter(f"adapter source {source!r} does not exist")


def _check_size(num_bytes: int) -> None:
    if num_bytes > MAX_WEIGHTS_BYTES:
        raise InvalidAdapter(f"adapter weights are {num_bytes} bytes; the limit is {MAX_WEIGHTS_BYTES}")


@contextmanager
def _open_archive(path: Path) -> Iterator[tarfile.TarFile]:
    """The archive open for reading; one that is not gzip, is truncated or corrupt is InvalidAdapter."""
    try:
        with tarfile.open(path, "r:gz") as archive:
            yield archive
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InvalidAdapter(f"{path} is not a readable .tar.gz archive ({error}); {PACK_HINT}") from error


def _archive_members(archive: tarfile.TarFile, path: Path) -> dict[str, tarfile.TarInfo]:
    """The config and weights members, which must be regular files at the archive's root. Nothing is
    ever extracted, but an archive with absolute paths, `..`, links, devices or repeated names is
    refused outright: whoever built it did not build a plain adapter archive. Each member's declared
    size is checked as its header is read, before tarfile inflates its data to skip it."""
    members: dict[str, tarfile.TarInfo] = {}
    num_bytes = 0
    for member in archive:  # headers one at a time, unlike getmembers()
        parts = Path(member.name).parts
        if member.name.startswith("/") or ".." in parts or not (member.isfile() or member.isdir()):
            raise InvalidAdapter(
                f"archive {path} holds an unsafe member {member.name!r} (absolute path, '..', link or "
                f"device); {PACK_HINT}"
            )
        name = member.name.removeprefix("./")
        if name in members:
            raise InvalidAdapter(f"archive {path} holds {name!r} twice; {PACK_HINT}")
        members[name] = member
        num_bytes += member.size
        if len(members) > MAX_ARCHIVE_MEMBERS or num_bytes > MAX_WEIGHTS_BYTES + MAX_CONFIG_BYTES:
            raise InvalidAdapter(
                f"archive {path} holds more than {MAX_ARCHIVE_MEMBERS} members or "
                f"{MAX_WEIGHTS_BYTES + MAX_CONFIG_BYTES} bytes; {PACK_HINT}"
            )
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in members or not members[name].isfile():
            nested = [other for other in members if other.endswith(f"/{name}")]
            found = f" (found {nested[0]!r}: the files must not sit in a folder)" if nested else ""
            raise InvalidAdapter(f"archive {path} has no regular file {name} at its root{found}; {PACK_HINT}")
    return {name: members[name] for name in (CONFIG_FILE, WEIGHTS_FILE)}


def _require_file(path: Path) -> Path:
    if not path.is_file():
        hint = (
            " (pickled .bin weights are not accepted; save with safetensors)"
            if path.name == WEIGHTS_FILE
            else ""
        )
        raise InvalidAdapter(f"{path} is missing{hint}")
    return path


def _read_config(path: Path) -> bytes:
    _check_config_size(_require_file(path).stat().st_size)
    return path.read_bytes()


def _read_archived_config(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    _check_config_size(member.size)
    return archive.extractfile(member).read()


def _check_config_size(num_bytes: int) -> None:
    if num_bytes > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is {num_bytes} bytes; the limit is {MAX_CONFIG_BYTES}")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(_require_file(path), "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_archive(path: Path) -> tuple[bytes, dict[str, tuple[int, ...]], str]:
    """The config, the weights' tensor shapes and their checksum, streamed out of the archive."""
    with _open_archive(path) as archive:
        members = _archive_members(archive, path)
        config_bytes = _read_archived_config(archive, members[CONFIG_FILE])
        weights_member = members[WEIGHTS_FILE]
        _check_size(weights_member.size)
        shapes = header_shapes(archive.extractfile(weights_member), weights_member.size)
        digest = hashlib.sha256()
        weights = archive.extractfile(weights_member)
        for block in iter(lambda: weights.read(1 << 20), b""):
            digest.update(block)
    return config_bytes, shapes, digest.hexdigest()


def _parse_config(config_bytes: bytes, checksum: str) -> AdapterMetadata:
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
