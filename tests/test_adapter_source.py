import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraplex.registry.adapter_config import InvalidAdapter
from loraplex.registry.adapter_source import read_metadata, validate_name

from peft_fixtures import pack_adapter, write_peft_adapter


def test_reads_a_peft_directory_and_the_same_adapter_as_tar_gz(tmp_path, tiny_model_dir):
    adapter = write_peft_adapter(
        tmp_path / "a", tiny_model_dir, rank=4, alpha=8, targets=("v_proj", "q_proj")
    )
    from_dir = read_metadata(str(adapter))
    assert (from_dir.rank, from_dir.alpha, from_dir.target_modules) == (4, 8.0, ("q_proj", "v_proj"))
    assert len(from_dir.checksum) == 64
    archive = pack_adapter(adapter, tmp_path / "a.tar.gz")
    assert read_metadata(f"file://{archive}") == from_dir


def test_pickled_weights_are_refused(tmp_path, tiny_model_dir):
    adapter = write_peft_adapter(tmp_path / "a", tiny_model_dir)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(InvalidAdapter, match="safetensors"):
        read_metadata(str(adapter))


def test_unsupported_targets_are_named(tmp_path, tiny_model_dir):
    adapter = write_peft_adapter(tmp_path / "a", tiny_model_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": ["q_proj", "lm_head"]})
    )
    with pytest.raises(InvalidAdapter, match="lm_head"):
        read_metadata(str(adapter))


@pytest.mark.parametrize("source", ["/does/not/exist", "s3://bucket/adapter"])
def test_missing_or_unconfigured_sources_are_refused(source):
    with pytest.raises(InvalidAdapter):
        read_metadata(source)


@pytest.mark.parametrize(
    "name", ["", "-x", "a/b", "x" * 129, "spaces no", "demo\n", "ns:adapter", "café", "\uff11", "a*"]
)
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidAdapter, match="name"):
        validate_name(name)


def test_a_huge_bad_name_is_not_quoted_whole():
    """gRPC carries a status message in 16 KiB of metadata: a longer one reached the caller as
    RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit', not as the refusal."""
    with pytest.raises(InvalidAdapter, match=r"\(100000 characters\) is invalid") as refused:
        validate_name("x" * 100_000)
    assert len(str(refused.value)) < 300


def _with_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))
    return adapter


def test_rank_and_alpha_patterns_give_each_module_peft_s_rank_and_scaling(tmp_path, tiny_model_dir):
    """PEFT's rule: the first pattern that the module path ends in (at a '.' boundary) wins."""
    adapter = write_peft_adapter(
        tmp_path / "a",
        tiny_model_dir,
        rank=8,
        alpha=16,
        rank_pattern={"q_proj": 16, r"layers\.1\.self_attn\.v_proj": 4},
        alpha_pattern={"v_proj": 2},
    )
    metadata = read_metadata(str(adapter))
    q0, v0, v1 = (f"model.layers.{n}.self_attn.{m}" for n, m in ((0, "q_proj"), (0, "v_proj"), (1, "v_proj")))
    assert [metadata.module_rank(path) for path in (q0, v0, v1)] == [16, 8, 4]
    assert [metadata.module_scaling(path) for path in (q0, v0, v1)] == [1.0, 0.25, 0.5]
    assert metadata.max_rank == 16
    assert metadata.module_rank("model.layers.0.self_attn.xq_proj") == 8, "only at a '.' boundary"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive int"),
        ({"rank_pattern": {"q_proj": 2.5}}, "must be a positive int"),
        ({"alpha_pattern": {"q_proj": "big"}}, "must be a positive float"),
        ({"alpha_pattern": {"q_proj(": 8}}, "not a valid regular expression"),
        ({"rank_pattern": ["q_proj"]}, "must map module patterns to values"),
    ],
)
def test_bad_patterns_are_named(tmp_path, tiny_model_dir, changes, message):
    adapter = _with_config(write_peft_adapter(tmp_path / "a", tiny_model_dir), **changes)
    with pytest.raises(InvalidAdapter, match=message):
        read_metadata(str(adapter))


def test_a_config_over_the_size_cap_is_refused_before_being_read(tmp_path, tiny_model_dir, monkeypatch):
    """A few KB of archive can inflate to a config of hundreds of MB: the cap applies to what it would
    be, from the directory's file size or the archive's member header."""
    monkeypatch.setattr("loraplex.registry.adapter_source.MAX_CONFIG_BYTES", 4096)
    adapter = write_peft_adapter(tmp_path / "a", tiny_model_dir)
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(config) + " " * 8192)
    archive = pack_adapter(adapter, tmp_path / "a.tar.gz")
    for source in (str(adapter), str(archive)):
        with pytest.raises(InvalidAdapter, match=r"adapter_config\.json is \d+ bytes; the limit is 4096"):
            read_metadata(source)


def _rewrite_weights(adapter, edit) -> None:
    weights = adapter / "adapter_model.safetensors"
    tensors = load_file(weights)
    edit(tensors)
    save_file(tensors, weights)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda a: (a / "adapter_model.safetensors").write_bytes(b"\x00" * 64),
            "not a valid safetensors file",
        ),
        (
            lambda a: (a / "adapter_model.safetensors").write_bytes(
                (a / "adapter_model.safetensors").read_bytes()[:-10]
            ),
            "the header accounts for",
        ),
        (lambda a: _with_config(a, r=16), r"are not of rank 16, which adapter_config\.json gives it"),
        (
            lambda a: _rewrite_weights(a, lambda t: t.pop(next(k for k in t if k.endswith("lora_B.weight")))),
            "needs both lora_A and lora_B",
        ),
        (
            lambda a: _rewrite_weights(a, lambda t: t.update(extra=torch.zeros(2))),
            "unexpected tensor 'extra'",
        ),
    ],
    ids=["zeros", "truncated", "rank-differs-from-config", "missing-b", "extra-tensor"],
)
def test_weights_that_do_not_match_their_config_are_refused_from_the_header(
    tmp_path, tiny_model_dir, damage, message
):
    """What the router checks before registering, without reading a tensor: directory and archive alike."""
    adapter = write_peft_adapter(tmp_path / "a", tiny_model_dir, rank=8)
    damage(adapter)
    archive = pack_adapter(adapter, tmp_path / "a.tar.gz")
    for source in (str(adapter), str(archive)):
        with pytest.raises(InvalidAdapter, match=message):
            read_metadata(source)
