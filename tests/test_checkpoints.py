"""Loading real-world checkpoint layouts and configs: what transformers loads we load to the same
logits, and what we cannot serve faithfully is refused at load with the tensor or setting named."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, Qwen2Config

from loraplex.shard.engine import Engine, EngineConfig
from loraplex.shard.model_config import ModelConfig
from loraplex.tools.tiny_model import write_tiny_model

from engine_helpers import (
    engine_last_logits,
    greedy_requests,
    reference_greedy,
    reference_last_logits,
    tokens,
)

LOGIT_ATOL = 1e-4  # fp32, as in test_engine_families
PROMPTS = [[5, 300, 1000, 42, *range(60, 100)], [7, 8, 9]]


def _engine(model_dir) -> Engine:
    return Engine(model_dir, EngineConfig(kv_cache_bytes=4 << 20, max_batch_tokens=64))


def _reference(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _assert_logits_match_transformers(model_dir) -> None:
    reference = _reference(model_dir)
    next_tokens = [77, 78]
    got = engine_last_logits(_engine(model_dir), PROMPTS, next_tokens)
    for prompt, token, logits in zip(PROMPTS, next_tokens, got, strict=True):
        expected = reference_last_logits(reference, prompt, token)
        torch.testing.assert_close(logits, expected, atol=LOGIT_ATOL, rtol=0)


def _rewrite_weights(model_dir, edit) -> None:
    path = model_dir / "model.safetensors"
    weights = load_file(path)
    edit(weights)
    save_file(weights, path, metadata={"format": "pt"})


def _rewrite_config(model_dir, **changes) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    config.update(changes)
    (model_dir / "config.json").write_text(json.dumps(config))


def test_a_sharded_checkpoint_loads_only_the_files_its_index_names(tmp_path, smollm2_dir):
    # Mistral's repositories ship consolidated.safetensors (other tensor names) beside the shards
    model_dir = write_tiny_model(tmp_path, smollm2_dir, family="mistral")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="2MB")
    assert len(list(model_dir.glob("model-*-of-*.safetensors"))) > 1
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, model_dir / "consolidated.safetensors")
    _assert_logits_match_transformers(model_dir)


def test_a_sharded_checkpoint_missing_a_tensor_or_a_file_is_refused_by_name(tmp_path, smollm2_dir):
    model_dir = write_tiny_model(tmp_path, smollm2_dir, family="mistral")
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    (model_dir / "model.safetensors").unlink()
    model.save_pretrained(model_dir, max_shard_size="2MB")
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.down_proj.weight"  # listed in the index, absent from its file
    shard = model_dir / weight_map[name]
    weights = load_file(shard)
    del weights[name]
    save_file(weights, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"lacks 1 tensors .*'{name}'"):
        _engine(model_dir)
    first = model_dir / weight_map["model.embed_tokens.weight"]
    first.unlink()
    with pytest.raises(FileNotFoundError, match=rf"index\.json names files missing .*{first.name}"):
        _engine(model_dir)


def test_a_tied_checkpoint_that_also_stores_the_lm_head_loads(tmp_path, smollm2_dir):
    model_dir = write_tiny_model(tmp_path, smollm2_dir, family="llama")  # tied
    _rewrite_weights(
        model_dir, lambda w: w.__setitem__("lm_head.weight", w["model.embed_tokens.weight"].clone())
    )
    _assert_logits_match_transformers(model_dir)


def test_a_tied_checkpoint_whose_stored_lm_head_differs_is_refused(tmp_path, smollm2_dir):
    # transformers then leaves the two untied and scores with lm_head.weight
    model_dir = write_tiny_model(tmp_path, smollm2_dir, family="llama")
    _rewrite_weights(
        model_dir, lambda w: w.__setitem__("lm_head.weight", w["model.embed_tokens.weight"] + 0.01)
    )
    with pytest.raises(ValueError, match=r"lm_head\.weight differs .* set tie_word_embeddings to false"):
        _engine(model_dir)


@pytest.mark.parametrize(
    ("edit", "config_changes", "named"),
    [
        (None, {"intermediate_size": 64}, r"mlp\.\w+_proj\.weight"),  # the weights are 128 wide
        (lambda w: w.__setitem__("model.norm.weight", torch.ones(1)), {}, "model.norm.weight"),
        (None, {"vocab_size": 49000}, "model.embed_tokens.weight"),
        (
            lambda w: w.__setitem__(
                "model.layers.1.self_attn.k_proj.weight", torch.zeros(48, 64)
            ),  # 3 heads of 16, not 2
            {},
            "k_proj.weight",
        ),
    ],
    ids=["config-narrower-than-weights", "norm-that-would-broadcast", "vocab", "kv-heads"],
)
def test_a_tensor_whose_shape_the_config_does_not_imply_is_refused_by_name(
    tmp_path, smollm2_dir, edit, config_changes, named
):
    model_dir = write_tiny_model(tmp_path, smollm2_dir)
    if edit is not None:
        _rewrite_weights(model_dir, edit)
    _rewrite_config(model_dir, **config_changes)
    with pytest.raises(ValueError, match=rf"{named}.* has shape .* config implies"):
        _engine(model_dir)


def test_a_missing_tensor_is_named_as_the_checkpoint_names_it(tmp_path, smollm2_dir):
    model_dir = write_tiny_model(tmp_path, smollm2_dir)
    _rewrite_weights(model_dir, lambda w: w.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"lacks 1 tensors .*'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        _engine(model_dir)


def test_qwen2_sliding_window_follows_max_window_layers(tmp_path, smollm2_dir):
    # use_sliding_window with max_window_layers >= the layers: transformers windows no layer
    model_dir = write_tiny_model(
        tmp_path, smollm2_dir, family="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    assert ModelConfig.from_dir(model_dir).sliding_window is None
    _assert_logits_match_transformers(model_dir)


def test_a_model_mixing_windowed_and_full_attention_layers_is_refused():
    config = Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ValueError, match="sliding window of 8 in layer 2 but full attention"):
        ModelConfig.from_hf(config)


def test_generation_stops_at_the_eos_ids_of_generation_config_as_transformers_does(tmp_path, smollm2_dir):
    # e.g. Llama-3-Instruct: config.json's eos is <|end_of_text|>, generation_config adds <|eot_id|>
    model_dir = write_tiny_model(tmp_path, smollm2_dir)
    prompt = PROMPTS[0]
    unstopped = reference_greedy(_reference(model_dir), prompt, 8, eos_token_id=None)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    (model_dir / "generation_config.json").write_text(
        json.dumps({**generation, "eos_token_id": [2, unstopped[2]]})
    )
    expected = reference_greedy(_reference(model_dir), prompt, 8)
    assert len(expected) <= 3
    outputs = _engine(model_dir).generate(greedy_requests([prompt], max_new_tokens=8))["r0"]
    assert tokens(outputs) == expected
    assert outputs[-1].finish_reason == "eos"


CONFIG_VARIANTS = {  # settings of real checkpoints that test_engine_families' variants leave out
    "linear-rope": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "yarn-rope": dict(
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 16.0,
            "original_max_position_embeddings": 32,
        }
    ),
    "llama-untied": dict(tie_word_embeddings=False),
    "qwen2-tied": dict(family="qwen2", tie_word_embeddings=True),
    "head-dim-not-hidden-over-heads": dict(head_dim=32),
    "attention-and-mlp-bias": dict(attention_bias=True, mlp_bias=True),
    "rms-norm-eps": dict(rms_norm_eps=0.25),
    # transformers' Llama ignores sliding_window (some converted configs carry one): no window
    "llama-with-a-sliding-window-key": dict(sliding_window=8),
    # only transformers' Llama reads attention_bias and mlp_bias; Qwen2 and Mistral fix their biases
    "qwen2-with-attention-bias-key": dict(family="qwen2", attention_bias=True),
    "mistral-with-mlp-bias-key": dict(family="mistral", mlp_bias=True, attention_bias=True),
    "swish-act": dict(hidden_act="swish"),  # transformers' name for silu too
    "qwen2-window-in-every-layer": dict(
        family="qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=0
    ),
}


@pytest.mark.parametrize("variant", sorted(CONFIG_VARIANTS))
def test_config_variant_gives_the_logits_of_transformers(tmp_path, smollm2_dir, variant):
    _assert_logits_match_transformers(write_tiny_model(tmp_path, smollm2_dir, **CONFIG_VARIANTS[variant]))


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope"])
def test_a_rope_type_whose_frequencies_change_with_length_is_refused_at_load(
    tmp_path, smollm2_dir, rope_type
):
    rope = {"rope_type": rope_type, "rope_theta": 10000.0, "factor": 4.0}
    if rope_type == "longrope":
        rope |= {"short_factor": [1.0] * 8, "long_factor": [2.0] * 8, "original_max_position_embeddings": 32}
    model_dir = write_tiny_model(tmp_path, smollm2_dir, rope_parameters=rope)
    with pytest.raises(ValueError, match=f"rope_type '{rope_type}' is not supported"):
        _engine(model_dir)


def test_a_rope_over_part_of_each_head_is_refused_at_load(tmp_path, smollm2_dir):
    # transformers' Llama computes yarn for part of the head, then fails at the first forward
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "partial_rotary_factor": 0.5}
    model_dir = write_tiny_model(tmp_path, smollm2_dir, rope_parameters=rope)
    with pytest.raises(ValueError, match=r"rotates 8 of the 16 dimensions .*partial_rotary_factor"):
        _engine(model_dir)


def test_a_single_file_checkpoint_ignores_other_safetensors_beside_it(tmp_path, smollm2_dir):
    # as transformers does: with no index it reads model.safetensors alone
    model_dir = write_tiny_model(tmp_path, smollm2_dir, family="mistral")
    save_file({"layers.0.attention.wq.weight": torch.zeros(4, 4)}, model_dir / "consolidated.safetensors")
    _assert_logits_match_transformers(model_dir)


def test_a_tiny_model_has_room_for_tokens_added_past_the_vocabulary(smollm2_dir, tmp_path):
    """Llama 3 numbers its special tokens after the BPE vocabulary: the tiny model's embedding must
    hold them, or a prompt with one indexes past the table."""
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer_dir.mkdir()
    tokenizer = json.loads((smollm2_dir / "tokenizer.json").read_text())
    base = len(tokenizer["model"]["vocab"])
    tokenizer["added_tokens"].append(
        {"id": base + 2, "content": "<|eot_id|>", "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": True}
    )
    (tokenizer_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    model_dir = write_tiny_model(tmp_path / "model", tokenizer_dir)
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == base + 3
