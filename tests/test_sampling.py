import pytest
import torch

from loraplex.shard.sampling import SamplingParams, TokenSampler


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("max_new_tokens", 0, "max_new_tokens"),
        ("temperature", -0.5, "temperature"),
        ("temperature", float("nan"), "temperature"),
        ("temperature", float("inf"), "temperature"),
        ("top_p", 0.0, "top_p"),
        ("top_p", 1.5, "top_p"),
        ("top_k", -1, "top_k"),
        ("repetition_penalty", 0.0, "repetition_penalty"),
        ("repetition_penalty", 1e-40, "repetition_penalty"),  # a logit divided by it overflows to inf
        ("repetition_penalty", float("inf"), "repetition_penalty"),
        ("repetition_penalty", float("nan"), "repetition_penalty"),
        ("top_p", float("nan"), "top_p"),
        ("top_logprobs", 21, "top_logprobs"),
        ("stop", ("",), "stop"),
    ],
)
def test_nonsense_values_are_rejected_with_the_field_named(field, value, message):
    kwargs = {"max_new_tokens": 4, field: value}
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_greedy_picks_the_argmax_and_reports_its_logprob():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.5])
    token = TokenSampler(SamplingParams(max_new_tokens=1, top_logprobs=2)).choose(logits, [])
    assert token.token_id == 1
    assert token.logprob == pytest.approx(float(torch.log_softmax(logits, -1)[1]))
    assert [token_id for token_id, _ in token.top] == [1, 3]


@pytest.mark.parametrize("temperature", [1e-38, 1e-40, 1e-6])
def test_a_tiny_temperature_is_greedy_instead_of_overflowing(temperature):
    logits = torch.tensor([30.0, 1.0, -2.0, 29.9])
    sampler = TokenSampler(SamplingParams(max_new_tokens=1, temperature=temperature, seed=0))
    assert sampler.params.greedy
    assert [sampler.choose(logits, [1, 3]).token_id for _ in range(5)] == [0] * 5


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(max_new_tokens=1, temperature=1.0, seed=seed))
        return [sampler.choose(logits, []).token_id for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_is_greedy_even_when_sampling():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(1))
    sampler = TokenSampler(SamplingParams(max_new_tokens=1, temperature=2.0, top_k=1, seed=3))
    assert {sampler.choose(logits, []).token_id for _ in range(10)} == {int(logits.argmax())}


def test_tiny_top_p_keeps_only_the_most_likely_token():
    logits = torch.tensor([1.0, 5.0, 2.0, 0.0])
    sampler = TokenSampler(SamplingParams(max_new_tokens=1, temperature=1.0, top_p=0.01, seed=0))
    assert {sampler.choose(logits, []).token_id for _ in range(10)} == {1}


def test_repetition_penalty_steers_greedy_away_from_seen_tokens():
    logits = torch.tensor([2.0, 1.9, -5.0])
    sampler = TokenSampler(SamplingParams(max_new_tokens=1, repetition_penalty=1.5))
    assert sampler.choose(logits, [0]).token_id == 1


@pytest.mark.parametrize("seed", [2**64 + 7, 7 - 2**64, -(2**70) + 7])
def test_any_integer_seed_is_accepted_and_seeds_equal_modulo_2_to_the_64_agree(seed):
    """torch rejects seeds outside [-2**63, 2**64): such a seed raised while the engine added the
    request, failing every request in flight and leaving its own caller unanswered."""
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))

    def draw(seed: int) -> list[int]:
        sampler = TokenSampler(SamplingParams(max_new_tokens=1, temperature=1.0, seed=seed))
        return [sampler.choose(logits, []).token_id for _ in range(20)]

    assert draw(seed) == draw(7)
