"""Heterogeneous LoRA batches on tiny random models: the base model and 8 adapters of ranks {4, 8, 16, 64}
with different target sets (two with per-module ranks and alphas) in one batch, every row checked
against PEFT running that adapter alone, through the plain-torch path and through the Triton kernels
(interpreted on CPU)."""

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.sampling import SamplingParams
from loraplex.tools.tiny_model import write_tiny_model

from engine_helpers import engine_last_logits, reference_greedy, reference_last_logits, tokens
from peft_fixtures import write_peft_adapter

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# PEFT's per-module overrides: a pattern matches module paths ending in it (model.layers.1.mlp.up_proj)
PATTERNS = {"rank_pattern": {"k_proj": 16, "layers.1.self_attn.q_proj": 4}, "alpha_pattern": {"o_proj": 2}}
RSLORA_PATTERNS = {"rank_pattern": {r"layers\.\d\.mlp\.up_proj": 32}, "alpha_pattern": {"gate_proj": 64}}
ADAPTERS = [  # (rank, targets, rslora, per-module patterns)
    (4, ("q_proj", "v_proj"), False, {}),
    (8, ATTENTION, False, PATTERNS),
    (16, MLP, True, RSLORA_PATTERNS),
    (64, ATTENTION + MLP, False, {}),
    (4, ("down_proj",), False, {}),
    (8, ("k_proj", "gate_proj"), True, {}),
    (16, ("o_proj", "up_proj"), False, {}),
    (64, ("q_proj",), False, {}),
]
LOGIT_ATOL = {"torch": 1e-4, "triton": 1e-3}  # fp32; the interpreted kernels accumulate in another order


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def family(request, tmp_path_factory, smollm2_dir):
    model_dir = write_tiny_model(tmp_path_factory.mktemp(request.param), smollm2_dir, family=request.param)
    sources = [
        write_peft_adapter(
            tmp_path_factory.mktemp(f"{request.param}-a{i}"),
            model_dir,
            rank=rank,
            alpha=2 * rank,
            targets=targets,
            use_rslora=rslora,
            seed=i,
            scale=0.3,
            **patterns,
        )
        for i, (rank, targets, rslora, patterns) in enumerate(ADAPTERS)
    ]
    return model_dir, sources


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_mixed_batch_of_base_and_8_adapters_matches_peft_row_by_row(family, backend):
    model_dir, sources = family
    engine = Engine(model_dir, EngineConfig(kv_cache_bytes=8 << 20, max_gpu_adapters=8, lora_backend=backend))
    adapters = [engine.load_adapter(str(source), f"a{i}", 1) for i, source in enumerate(sources)]
    prompts = [[5 + i, 300 + 7 * i, 1000 + i, 42, *range(60, 60 + i)] for i in range(len(adapters) + 1)]
    rows = [None, *adapters]  # row 0 is the base model
    requests = [
        EngineRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True), adapter=adapter)
        for i, (prompt, adapter) in enumerate(zip(prompts, rows, strict=True))
    ]
    outputs = engine.generate(requests)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    references = [base] + [
        PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), s
        ).eval()
        for s in sources
    ]
    ours = engine_last_logits(engine, prompts, [77] * len(prompts), rows)
    for i, (prompt, reference) in enumerate(zip(prompts, references, strict=True)):
        assert tokens(outputs[f"r{i}"]) == reference_greedy(reference, prompt, 6, eos_token_id=None), (
            f"row {i}"
        )
        expected = reference_last_logits(reference, prompt, 77)
        torch.testing.assert_close(ours[i], expected, atol=LOGIT_ATOL[backend], rtol=0)
    assert engine.slots.counters.misses == len(adapters)
