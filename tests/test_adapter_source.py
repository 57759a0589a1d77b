import json

import pytest

from loraplex.registry.adapter_source import InvalidAdapter, read_metadata, validate_name

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


@pytest.mark.parametrize("name", ["", "-x", "a/b", "x" * 129, "spaces no"])
def test_bad_names_are_refused(name):
    with pytest.raises(InvalidAdapter, match="name"):
        validate_name(name)
