"""LoRA in the engine: one batch mixing the base model and several adapters, each row checked against
PEFT running that adapter alone on the same weights."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.lora import IncompatibleAdapter, load_adapter
from loraplex.shard.sampling import SamplingParams

from engine_helpers import engine_last_logits, reference_greedy, reference_last_logits, tokens
from peft_fixtures import write_peft_adapter

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOGIT_ATOL = 1e-3  # fp32 on CPU, same math in another order (measured <= 7e-4, rank-64 all-target row)
ADAPTERS = {  # name -> (rank, alpha, targets, rslora): ranks {4, 8, 16, 64}, different target sets
    "qv-r4": (4, 8, ("q_proj", "v_proj"), False),
    "all-r16": (16, 16, ALL_TARGETS, False),
    "mlp-o-r8-rslora": (8, 16, ("o_proj", "gate_proj", "up_proj", "down_proj"), True),
    "attn-r64": (64, 64, ("q_proj", "k_proj", "v_proj", "o_proj"), False),
    "down-r4": (4, 4, ("down_proj",), False),
    "kv-gate-r8": (8, 32, ("k_proj", "v_proj", "gate_proj"), False),
    "up-o-r16-rslora": (16, 8, ("o_proj", "up_proj"), True),
    "all-r64": (64, 128, ALL_TARGETS, False),
}


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return Engine(smollm2_dir, EngineConfig(kv_cache_bytes=128 << 20, max_gpu_adapters=8))


def _load(engine, source, name, version=1, max_rank=64):
    return load_adapter(
        str(source), name, version, engine.model.lora_targets(), engine.model_config.num_layers, max_rank
    )


@pytest.fixture(scope="module")
def adapters(engine, smollm2_dir, tmp_path_factory):
    """name -> (our LoraAdapter, its PEFT directory)."""
    loaded = {}
    for seed, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        source = write_peft_adapter(
            tmp_path_factory.mktemp(name),
            smollm2_dir,
            rank=rank,
            alpha=alpha,
            targets=targets,
            scale=0.2,
            use_rslora=rslora,
            seed=seed,
        )
        loaded[name] = (_load(engine, source, name), source)
    return loaded


def _peft(smollm2_dir, source):
    base = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, source).eval()


def test_a_batch_mixing_base_and_adapters_matches_peft_row_by_row(engine, adapters, smollm2_dir):
    questions = ["What is the capital of France?", "Write a short poem about rain."]
    rows = [(question, name) for question in questions for name in (None, *ADAPTERS)]
    requests = [
        EngineRequest(
            f"r{i}",
            engine.prompts.encode_text(question, True),
            SamplingParams(max_new_tokens=10, ignore_eos=True),
            adapter=adapters[name][0] if name else None,
        )
        for i, (question, name) in enumerate(rows)
    ]
    outputs = engine.generate(requests)
    references = {name: _peft(smollm2_dir, adapters[name][1]) for name in ADAPTERS}
    references[None] = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    base_tokens = {}
    for request, (question, name) in zip(requests, rows, strict=True):
        expected = reference_greedy(references[name], request.prompt_ids, 10, eos_token_id=None)
        assert tokens(outputs[request.request_id]) == expected, (question, name)
        if name is None:
            base_tokens[question] = expected
        else:
            assert expected != base_tokens[question], f"{name} should change the greedy output"

    prompts = [request.prompt_ids for request in requests]
    next_tokens = [100 + i for i in range(len(requests))]
    ours = engine_last_logits(engine, prompts, next_tokens, [request.adapter for request in requests])
    for (_, name), prompt_ids, token, logits in zip(rows, prompts, next_tokens, ours, strict=True):
        expected = reference_last_logits(references[name], prompt_ids, token)
        torch.testing.assert_close(logits, expected, atol=LOGIT_ATOL, rtol=0)


def test_adapter_for_another_model_is_incompatible(engine, tiny_model_dir, tmp_path):
    source = write_peft_adapter(tmp_path / "tiny", tiny_model_dir)
    with pytest.raises(IncompatibleAdapter, match="do not fit the base model"):
        _load(engine, source, "tiny")


def test_rank_above_the_limit_is_incompatible(engine, smollm2_dir, tmp_path):
    source = write_peft_adapter(tmp_path / "big", smollm2_dir, rank=32, targets=("q_proj",))
    with pytest.raises(IncompatibleAdapter, match="--max-lora-rank 16"):
        _load(engine, source, "big", max_rank=16)
