import subprocess
import sys
import time

import pytest
from safetensors import safe_open

from loraplex.tools.model_store import DEFAULT_MODEL, is_prepared, prepare_model, resolve_model


def test_prepared_smollm2_is_plain_safetensors_with_tokenizer(smollm2_dir):
    assert is_prepared(smollm2_dir)
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        assert (smollm2_dir / name).is_file()
    with safe_open(smollm2_dir / "model.safetensors", "pt") as weights:
        assert "model.layers.29.mlp.down_proj.weight" in set(weights.keys())
        assert weights.get_tensor("model.embed_tokens.weight").shape == (49152, 576)
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()


def test_prepare_is_idempotent_and_fast_the_second_time(smollm2_dir, cache_dir):
    started = time.monotonic()
    assert prepare_model(DEFAULT_MODEL, cache_dir) == smollm2_dir
    assert time.monotonic() - started < 2


def test_model_argument_resolves_directories_and_refuses_unknown_ids(tiny_model_dir, cache_dir):
    assert resolve_model(str(tiny_model_dir), cache_dir) == tiny_model_dir
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        resolve_model("no-such-model", cache_dir)


def test_a_cache_dir_that_cannot_be_written_is_a_usage_error_before_any_conversion(tmp_path):
    """Not a traceback after a minute of dequantizing: `model prepare` (and `up`, and a shard, which
    prepare the same way) stop at once naming the directory and the flag that moves it."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    cache = blocker / "cache"  # cannot be created: its parent is a file
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "loraplex.tools.cli", "model", "prepare", "--cache-dir", str(cache)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert f"cannot write the model cache in {cache}" in run.stderr and "--cache-dir" in run.stderr
    assert "Traceback" not in run.stderr
    assert time.monotonic() - started < 20, "it must not convert the model first"
