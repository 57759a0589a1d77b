"""The foundation backend against transformers' own generate on the same weights."""

import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.shard.detokenizer import IncrementalDetokenizer
from loraplex.shard.hf_backend import HFBackend
from loraplex.shard.sampling import SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in one sentence.",
]


@pytest.fixture(scope="module")
def backend(smollm2_dir):
    return HFBackend(smollm2_dir)


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def _run(backend, prompt_ids, params, **kwargs):
    return list(backend.generate(prompt_ids, params, threading.Event(), **kwargs))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_equal_transformers_generate(backend, reference, prompt):
    prompt_ids = backend.encode_text(prompt, apply_chat_template=True)
    steps = _run(backend, prompt_ids, SamplingParams(max_new_tokens=24))
    expected = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=24, do_sample=False)
    assert [s.token.token_id for s in steps] == expected[0, len(prompt_ids) :].tolist()
    text = "".join(s.text for s in steps)
    assert text == backend.tokenizer.decode([s.token.token_id for s in steps], skip_special_tokens=True)


def test_capital_of_france_mentions_paris(backend):
    steps = _run(backend, backend.encode_text(PROMPTS[0], True), SamplingParams(max_new_tokens=24))
    assert "Paris" in "".join(s.text for s in steps)
    assert steps[-1].finish_reason == "eos"


def test_prompt_logprobs_match_the_reference_forward(backend, reference):
    prompt_ids = backend.encode_text("The quick brown fox", apply_chat_template=False)
    first = _run(backend, prompt_ids, SamplingParams(max_new_tokens=1), want_prompt_logprobs=True)[0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt_ids])).logits[0].float()
    expected = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(prompt_ids[1:])[:, None]).squeeze(1)
    assert first.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(first.prompt_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)


def test_max_new_tokens_is_respected_with_finish_reason_length(backend):
    steps = _run(backend, backend.encode_text("Count: 1, 2, 3,", False), SamplingParams(max_new_tokens=5))
    assert len(steps) == 5 and steps[-1].finish_reason == "length"
    assert all(step.finish_reason is None for step in steps[:-1])


def test_stop_string_ends_generation_and_is_not_returned(backend):
    prompt_ids = backend.encode_text(PROMPTS[0], apply_chat_template=True)
    steps = _run(backend, prompt_ids, SamplingParams(max_new_tokens=24, stop=(" Paris",)))
    assert steps[-1].finish_reason == "stop"
    assert "".join(s.text for s in steps) == "The capital of France is"


def test_cancellation_stops_after_the_current_token(backend):
    cancelled = threading.Event()
    steps = backend.generate(
        backend.encode_text("Once upon a time", False), SamplingParams(max_new_tokens=50), cancelled
    )
    next(steps)
    cancelled.set()
    assert len(list(steps)) <= 1


def test_context_and_output_limits_are_explained(backend):
    with pytest.raises(ValueError, match="context is 8192"):
        backend.resolve_max_new_tokens(8192, None)
    with pytest.raises(ValueError, match=r"1\.\.8092"):
        backend.resolve_max_new_tokens(100, 9000)
    assert backend.resolve_max_new_tokens(8190, None) == 2


def test_detokenizer_holds_back_partial_utf8(smollm2_dir):
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    text = "Snow ☃ and 🎉 confetti, naïve café"
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in tokenizer.encode(text)]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text
