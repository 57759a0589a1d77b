"""Every Llama-family variant we serve, on tiny random models, against transformers on the same weights:
concurrent greedy generation token for token and last-step logits, plus preemption under a small cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.shard.engine import Engine, EngineConfig
from loraplex.tools.tiny_model import write_tiny_model

from engine_helpers import (
    engine_last_logits,
    greedy_requests,
    reference_greedy,
    reference_last_logits,
    tokens,
)

LOGIT_ATOL = 1e-4  # fp32; the tiny models' logits are ~1 in magnitude and agree to ~1e-6

VARIANTS = {
    "llama": dict(family="llama"),
    "qwen2-with-bias": dict(family="qwen2"),
    "mistral": dict(family="mistral"),
    "mistral-sliding-window-24": dict(family="mistral", sliding_window=24),
    "llama3-rope-scaling": dict(
        family="llama",
        num_kv_heads=1,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
}


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def variant(request, tmp_path_factory, smollm2_dir):
    model_dir = write_tiny_model(
        tmp_path_factory.mktemp(request.param), smollm2_dir, **VARIANTS[request.param]
    )
    engine = Engine(model_dir, EngineConfig(kv_cache_bytes=16 << 20, max_batch_tokens=64))
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model_dir, engine, reference


def _prompts(count: int = 20) -> list[list[int]]:
    """Mixed lengths from 3 to ~150 tokens (the model's vocabulary is SmolLM2's)."""
    generator = torch.Generator().manual_seed(0)
    lengths = [3, 150, 17, 64, 65, 1, 33, 100] + [
        int(n) for n in torch.randint(2, 80, (count - 8,), generator=generator)
    ]
    return [torch.randint(3, 49000, (n,), generator=generator).tolist() for n in lengths]


def test_concurrent_greedy_output_equals_transformers(variant):
    _, engine, reference = variant
    prompts = _prompts()
    outputs = engine.generate(greedy_requests(prompts, max_new_tokens=10, ignore_eos=True))
    for i, prompt_ids in enumerate(prompts):
        expected = reference_greedy(reference, prompt_ids, 10, eos_token_id=None)
        assert tokens(outputs[f"r{i}"]) == expected, f"prompt {i} ({len(prompt_ids)} tokens)"


def test_last_step_logits_match_transformers(variant):
    _, engine, reference = variant
    prompts = _prompts()[:8]
    next_tokens = list(range(100, 108))
    for prompt_ids, token, logits in zip(
        prompts, next_tokens, engine_last_logits(engine, prompts, next_tokens), strict=True
    ):
        torch.testing.assert_close(
            logits, reference_last_logits(reference, prompt_ids, token), atol=LOGIT_ATOL, rtol=0
        )


def test_preemption_under_a_small_cache_gives_the_same_tokens(variant):
    model_dir, engine, _ = variant
    prompts = _prompts(12)[:12]
    expected = engine.generate(greedy_requests(prompts, max_new_tokens=24, ignore_eos=True))
    bytes_per_token = engine.model_config.kv_bytes_per_token(torch.float32)
    small = Engine(model_dir, EngineConfig(kv_cache_bytes=16 * 16 * bytes_per_token, max_batch_tokens=64))
    assert small.blocks.num_blocks == 16  # 256 tokens for 12 sequences that need ~900
    outputs = small.generate(greedy_requests(prompts, max_new_tokens=24, ignore_eos=True))
    assert small.stats.num_preemptions > 0
    for name, expected_outputs in expected.items():
        assert tokens(outputs[name]) == tokens(expected_outputs), name
    assert small.blocks.num_used_blocks == 0
