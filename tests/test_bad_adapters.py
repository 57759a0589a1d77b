"""Bad adapters through a real router and shard: each is refused at registration with a clear error
and nothing written, and the shard keeps serving the base model and the good adapters. (The shard's own
checks at load, for adapters registered while no shard was live, are in test_lora.)"""

import contextlib
import io
import json
import tarfile
from pathlib import Path

import grpc
import pytest

from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc, common_pb2, generation_pb2_grpc
from loraplex.registry import adapter_source
from loraplex.registry.adapter_config import InvalidAdapter
from loraplex.registry.adapter_source import read_adapter
from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.tiny_model import write_tiny_model

from peft_fixtures import write_peft_adapter

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture(scope="module")
def mesh(tiny_model_dir, redis_url, tmp_path_factory):
    mesh = start_mesh(
        tiny_model_dir,
        redis_url,
        "bad-adapters",
        tmp_path_factory.mktemp("logs"),
        num_shards=1,
        shard_args=("--max-lora-rank", "16"),
    )
    yield mesh
    mesh.stop()


@pytest.fixture(scope="module")
def stubs(mesh):
    with grpc.insecure_channel(mesh.router) as channel:
        yield adapters_pb2_grpc.AdaptersStub(channel), generation_pb2_grpc.GenerationStub(channel)


def _archive(path: Path, members: dict[str, bytes], link: str | None = None) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            archive.addfile(info)
    return path


def _bad_sources(
    root: Path, model_dir: Path, smollm2_dir: Path
) -> dict[str, tuple[Path, grpc.StatusCode, str]]:
    """case -> (source, expected status, hint in the message)."""
    good = write_peft_adapter(root / "good-files", model_dir)
    files = {
        name: (good / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")
    }
    corrupt = write_peft_adapter(root / "corrupt", model_dir)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    unknown_target = write_peft_adapter(root / "unknown-target", model_dir)
    config = json.loads((unknown_target / "adapter_config.json").read_text())
    (unknown_target / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj", "wte"]})
    )
    pickle_only = write_peft_adapter(root / "pickle", model_dir)
    (pickle_only / "adapter_model.safetensors").rename(pickle_only / "adapter_model.bin")
    no_config = write_peft_adapter(root / "no-config", model_dir)
    (no_config / "adapter_config.json").unlink()
    not_gzip = root / "not-gzip.tar.gz"
    not_gzip.write_bytes(b"plain text")  # was a bare tarfile.ReadError: UNKNOWN, not INVALID_ARGUMENT
    return {
        "corrupt-safetensors": (corrupt, INVALID, "not a valid safetensors file"),
        "wrong-shapes": (write_peft_adapter(root / "other-base", smollm2_dir), PRECONDITION, "do not fit"),
        "rank-above-limit": (
            write_peft_adapter(root / "r32", model_dir, rank=32),
            PRECONDITION,
            "--max-lora-rank 16",
        ),
        "unknown-target": (unknown_target, INVALID, "wte"),
        "pickle-only": (pickle_only, INVALID, "safetensors"),
        "missing-config": (no_config, INVALID, "adapter_config.json"),
        "dotdot-archive": (
            _archive(root / "dotdot.tar.gz", {**files, "../evil": b"x"}),
            INVALID,
            "unsafe member",
        ),
        "absolute-archive": (
            _archive(root / "abs.tar.gz", {**files, "/tmp/evil": b"x"}),
            INVALID,
            "unsafe member",
        ),
        "symlink-archive": (
            _archive(root / "link.tar.gz", files, link="adapter_extra"),
            INVALID,
            "unsafe member",
        ),
        "not-gzip-archive": (not_gzip, INVALID, "not a readable .tar.gz archive"),
    }


CASES = [
    "corrupt-safetensors",
    "wrong-shapes",
    "rank-above-limit",
    "unknown-target",
    "pickle-only",
    "missing-config",
    "dotdot-archive",
    "absolute-archive",
    "symlink-archive",
    "not-gzip-archive",
]


@pytest.fixture(scope="module")
def bad_sources(tmp_path_factory, tiny_model_dir, smollm2_dir):
    # A tiny model of another shape stands in for "another base model" (cheaper than SmolLM2 here).
    other = write_tiny_model(
        tmp_path_factory.mktemp("other"), smollm2_dir, hidden_size=32, num_heads=2, num_kv_heads=1
    )
    return _bad_sources(tmp_path_factory.mktemp("bad"), tiny_model_dir, other)


def _generate(generation, adapter: str = "") -> common_pb2.GenerateResponse:
    request = common_pb2.GenerateRequest(
        adapter=adapter,
        prompt_token_ids=[5, 6, 7],
        parameters=common_pb2.SamplingParameters(max_new_tokens=3, ignore_eos=True),
    )
    return generation.Generate(request, timeout=30)


@pytest.mark.parametrize("case", CASES)
def test_a_bad_adapter_gets_a_clear_error_and_the_shard_keeps_serving(
    stubs, bad_sources, tiny_model_dir, tmp_path, case
):
    admin, generation = stubs
    source, code, hint = bad_sources[case]
    good = write_peft_adapter(tmp_path / "good", tiny_model_dir, scale=0.3)
    admin.Create(adapters_pb2.CreateAdapterRequest(name=f"good-{case}", source=str(good)))
    try:
        # the router reads the config and the weights' header, and fits them to what the live shard
        # publishes of its model and rank limit, before anything is written
        with pytest.raises(grpc.RpcError) as refused:
            admin.Create(adapters_pb2.CreateAdapterRequest(name=case, source=str(source)))
        assert (refused.value.code(), hint in refused.value.details()) == (code, True), (
            refused.value.details()
        )
        with pytest.raises(grpc.RpcError) as lookup:
            admin.Get(adapters_pb2.GetAdapterRequest(name=case))
        assert lookup.value.code() == grpc.StatusCode.NOT_FOUND
        assert _generate(generation).usage.completion_tokens == 3
        assert _generate(generation, f"good-{case}").served_by.adapter == f"good-{case}"
    finally:
        for name in (case, f"good-{case}"):
            with contextlib.suppress(grpc.RpcError):  # the bad one is not there, unless the test failed
                admin.Delete(adapters_pb2.DeleteAdapterRequest(name=name))


def test_weights_over_the_size_cap_are_refused_before_being_read(tmp_path, tiny_model_dir, monkeypatch):
    adapter = write_peft_adapter(tmp_path / "a", tiny_model_dir)
    monkeypatch.setattr(adapter_source, "MAX_WEIGHTS_BYTES", 1000)
    with pytest.raises(InvalidAdapter, match="the limit is 1000"):
        read_adapter(str(adapter))
