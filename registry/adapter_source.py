"""Reading an adapter from its source: its metadata without loading weights, or its files' bytes.

A source is a local path or a file:// URI naming a PEFT directory (adapter_config.json +
adapter_model.safetensors) or a .tar.gz holding those two files at its root. Besides the config, the
weights' safetensors header is read and checked against it (adapter_weights.lora_modules): which
modules carry LoRA A/B pairs, at which ranks. The router runs this before an adapter enters the
catalogue, no tensor read; the shard runs the same check on the loaded tensors, then checks the shapes
against its own model.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import tarfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from urllib.parse import unquote, urlparse

from loraplex.protos.rpc import quoted
from loraplex.registry.adapter_config import (
    CONFIG_FILE,
    SUPPORTED_TARGETS,
    WEIGHTS_FILE,
    AdapterMetadata,
    InvalidAdapter,
    parse_config,
)
from loraplex.registry.adapter_weights import ModelFit, check_fit, header_shapes, lora_modules
from loraplex.registry.records import AdapterRecord

MAX_WEIGHTS_BYTES = 2 << 30  # an adapter's weights past 2 GiB are refused before being read
MAX_CONFIG_BYTES = 1 << 20  # so is an adapter_config.json past 1 MiB (PEFT writes about 1 KiB)
MAX_ARCHIVE_MEMBERS = 64  # an adapter archive holds two files (and perhaps a README): more is refused
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Names the REST gateway reads as the base model (OpenAI's `model`, TGI's `adapter_id`), beside the
# model's own: "base", and the placeholders TGI's users send, "tgi" (TGI's docs) and "dummy" (what
# huggingface_hub's InferenceClient sends when given a URL). No adapter may take one.
BASE_MODEL_ALIASES = ("base", "tgi", "dummy")
PACK_HINT = (
    "pack it with: tar -czf adapter.tar.gz -C ADAPTER_DIR adapter_config.json adapter_model.safetensors"
)


def catalogue_record(name: str, source: str, base_model: str, fit: ModelFit | None = None) -> AdapterRecord:
    """The catalogue entry for a new adapter: its name checked, its source (an absolute path: every
    process reads it) read (blocking I/O) and, given the model it is for, its shapes fitted to it.
    InvalidAdapter or IncompatibleAdapter name the problem."""
    validate_name(name)
    if not local_path(source).is_absolute():
        raise InvalidAdapter(
            f"adapter source {source!r} is a relative path, which the router and every shard would resolve "
            "from their own working directories; give an absolute path or a file:// URI"
        )
    if name in base_model_names(base_model):
        raise InvalidAdapter(
            f"adapter name {name!r} already means the base model ({sorted(base_model_names(base_model))} "
            "all do, over the REST API): an adapter by that name could be reached over gRPC only; "
            "choose another name"
        )
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


def base_model_names(model: str) -> frozenset[str]:
    """Every name that means the base model `model` (an id or a path) rather than an adapter."""
    return frozenset({model, Path(model).name, *BASE_MODEL_ALIASES})


def validate_name(name: str) -> None:
    if not ADAPTER_NAME.fullmatch(name):  # match's $ would let a trailing newline through
        raise InvalidAdapter(
            f"adapter name {quoted(name)} is invalid: use 1-128 letters, digits, '.', '_' or '-', "
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
    metadata = parse_config(config_bytes, weights_digest)
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
    return parse_config(config_bytes, hashlib.sha256(weights).hexdigest()), weights


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
    parse_config(config_bytes, "")  # a bad config fails here, before anything is cached
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
