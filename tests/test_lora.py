"""LoRA on the foundation backend against PEFT running the same adapter on the same weights."""

import threading

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.shard.hf_backend import HFBackend
from loraplex.shard.lora import AdapterCache, IncompatibleAdapter, applied, load_adapter
from loraplex.shard.sampling import SamplingParams

from peft_fixtures import write_peft_adapter

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOGIT_TOLERANCE = 1e-4  # fp32 on CPU: the same math in a different order


@pytest.fixture(scope="module")
def backend(smollm2_dir):
    return HFBackend(smollm2_dir)


@pytest.mark.parametrize(
    ("rank", "alpha", "targets", "use_rslora"),
    [
        (4, 8, ("q_proj", "v_proj"), False),
        (16, 16, ALL_TARGETS, False),
        (8, 16, ("o_proj", "gate_proj", "up_proj", "down_proj"), True),
    ],
)
def test_adapter_matches_peft_tokens_and_logits(
    backend, smollm2_dir, tmp_path, rank, alpha, targets, use_rslora
):
    source = write_peft_adapter(
        tmp_path / "adapter",
        smollm2_dir,
        rank=rank,
        alpha=alpha,
        targets=targets,
        scale=0.2,
        use_rslora=use_rslora,
    )
    adapter = load_adapter(str(source), "a", 1, backend.model, max_rank=64)
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32), source
    ).eval()
    prompt_ids = backend.encode_text("What is the capital of France?", apply_chat_template=True)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)

    ours = [
        s.token.token_id for s in backend.generate(prompt_ids, params, threading.Event(), adapter=adapter)
    ]
    base = [s.token.token_id for s in backend.generate(prompt_ids, params, threading.Event())]
    with torch.no_grad():
        # attention_mask spelled out: with eos_token_id=None, generate would treat the prompt's
        # <|im_end|> tokens (id 2, the pad id) as padding.
        prompt = torch.tensor([prompt_ids])
        expected = reference.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
        )[0, len(prompt_ids) :].tolist()
    assert ours == expected
    assert ours != base, "the adapter should change the greedy output"

    with torch.no_grad(), applied(backend.model, adapter):
        our_logits = backend.model(torch.tensor([prompt_ids])).logits
    with torch.no_grad():
        reference_logits = reference(torch.tensor([prompt_ids])).logits
    torch.testing.assert_close(our_logits, reference_logits, atol=LOGIT_TOLERANCE, rtol=LOGIT_TOLERANCE)


def test_hooks_are_removed_after_the_request(backend, smollm2_dir, tmp_path):
    adapter = load_adapter(
        str(write_peft_adapter(tmp_path / "a", smollm2_dir, scale=0.05)), "a", 1, backend.model, 64
    )
    ids = torch.tensor([backend.encode_text("Hello", False)])
    with torch.no_grad():
        before = backend.model(ids).logits
        with applied(backend.model, adapter):
            during = backend.model(ids).logits
        after = backend.model(ids).logits
    assert not torch.allclose(before, during)
    torch.testing.assert_close(before, after, atol=0, rtol=0)


def test_adapter_for_another_model_is_incompatible(backend, tiny_model_dir, tmp_path):
    source = write_peft_adapter(tmp_path / "tiny", tiny_model_dir)
    with pytest.raises(IncompatibleAdapter, match="do not fit the base model"):
        load_adapter(str(source), "tiny", 1, backend.model, max_rank=64)


def test_rank_above_the_limit_is_incompatible(backend, smollm2_dir, tmp_path):
    source = write_peft_adapter(tmp_path / "big", smollm2_dir, rank=32, targets=("q_proj",))
    with pytest.raises(IncompatibleAdapter, match="max_lora_rank 16"):
        load_adapter(str(source), "big", 1, backend.model, max_rank=16)


def test_cache_evicts_least_recently_used_and_drops_versions(backend, smollm2_dir, tmp_path):
    source = str(write_peft_adapter(tmp_path / "a", smollm2_dir, targets=("q_proj",)))
    cache = AdapterCache(max_adapters=2)
    for name in ("x", "y"):
        cache.put(load_adapter(source, name, 1, backend.model, 64))
    cache.get("x", 1)
    cache.put(load_adapter(source, "z", 1, backend.model, 64))
    assert cache.held() == [("x", 1), ("z", 1)]
    cache.put(load_adapter(source, "x", 2, backend.model, 64))
    assert cache.held() == [("z", 1), ("x", 2)]
    cache.put(load_adapter(source, "x", 3, backend.model, 64))
    assert cache.drop("x", 2) == 1 and cache.held() == [("x", 3)]
    cache.put(load_adapter(source, "x", 4, backend.model, 64))
    assert cache.drop("x") == 2 and cache.held() == []
