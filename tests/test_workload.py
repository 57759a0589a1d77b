"""The open-loop workload: arrivals at the offered rate with the asked-for burstiness, Punica's adapter
mixes, lengths in their range, and the same requests whatever the rate (so runs compare)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from loraplex.tools.workload import WorkloadSpec, adapter_choices, base_only, plan


def gaps(spec: WorkloadSpec) -> np.ndarray:
    return np.diff([request.at_s for request in plan(spec)])


def test_poisson_arrivals_have_the_offered_rate_and_exponential_spread() -> None:
    spec = WorkloadSpec(num_requests=20_000, rate=4.0, num_adapters=10)
    between = gaps(spec)
    assert plan(spec)[0].at_s == 0.0
    assert between.mean() == pytest.approx(0.25, rel=0.03)
    assert between.std() / between.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV 1


def test_gamma_shape_below_one_is_burstier_at_the_same_rate() -> None:
    spec = WorkloadSpec(num_requests=20_000, rate=4.0, arrival="gamma", burstiness=0.25, num_adapters=10)
    between = gaps(spec)
    assert between.mean() == pytest.approx(0.25, rel=0.05)
    assert between.std() / between.mean() == pytest.approx(2.0, rel=0.1)  # CV 1/sqrt(shape)


def test_an_infinite_rate_sends_everything_at_once() -> None:
    assert {request.at_s for request in plan(WorkloadSpec(num_requests=50))} == {0.0}


@pytest.mark.parametrize("arrival", ["poisson", "gamma"])
def test_the_rate_only_rescales_the_gaps_and_keeps_the_requests(arrival: str) -> None:
    slow = plan(WorkloadSpec(num_requests=200, rate=1.0, arrival=arrival, burstiness=0.5, len_spread=0.5))
    fast = plan(WorkloadSpec(num_requests=200, rate=4.0, arrival=arrival, burstiness=0.5, len_spread=0.5))
    assert [r.at_s / 4 for r in slow] == pytest.approx([r.at_s for r in fast])
    assert [(r.adapter, r.prompt, r.max_new_tokens) for r in slow] == [
        (r.adapter, r.prompt, r.max_new_tokens) for r in fast
    ]


def test_lengths_stay_in_their_spread_and_prompts_differ() -> None:
    requests = plan(WorkloadSpec(num_requests=500, input_len=100, output_len=40, len_spread=0.5))
    outputs = [r.max_new_tokens for r in requests]
    words = [len(r.prompt.split()) for r in requests]
    assert 20 <= min(outputs) < 25 and 55 < max(outputs) <= 60
    assert min(words) >= 50 and max(words) <= 150
    assert len({r.prompt for r in requests}) == 500
    exact = plan(WorkloadSpec(num_requests=20, input_len=7, output_len=3))
    assert {(len(r.prompt.split()), r.max_new_tokens) for r in exact} == {(7, 3)}


def test_distinct_and_identical_mixes() -> None:
    rng = np.random.default_rng(0)
    assert adapter_choices(rng, "distinct", 4, 10) == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert adapter_choices(rng, "identical", 4, 5) == [0] * 5


def test_uniform_spreads_evenly_and_zipf_favours_the_first_adapters() -> None:
    uniform = np.bincount(adapter_choices(np.random.default_rng(0), "uniform", 10, 10_000), minlength=10)
    assert uniform.min() > 900 and uniform.max() < 1100
    zipf = np.bincount(adapter_choices(np.random.default_rng(0), "zipf", 100, 5000, alpha=1.0), minlength=100)
    assert zipf[0] > zipf[9] > zipf[99] >= 0
    assert 0.15 < zipf[0] / 5000 < 0.24  # 1 / H(100) = 0.19
    skewed = np.bincount(adapter_choices(np.random.default_rng(0), "skewed", 100, 5000), minlength=100)
    assert skewed[0] / 5000 > 0.3  # Zipf 1.5: 1 / H(100, 1.5) = 0.41


def test_base_only_keeps_everything_but_the_adapter() -> None:
    requests = plan(WorkloadSpec(num_requests=30, rate=2.0, num_adapters=5))
    base = base_only(requests)
    assert {r.adapter for r in base} == {None}
    assert [replace(r, adapter=None) for r in requests] == base


def test_prompt_sets_change_only_the_words() -> None:
    """Runs against one server take a prompt set each, so none finds another's prompts in the prefix
    cache, yet they do the same work: same arrivals, adapters and lengths."""
    spec = WorkloadSpec(num_requests=50, rate=3.0, len_spread=0.5)
    first, second = plan(spec), plan(replace(spec, prompt_set=1))
    assert [replace(r, prompt="") for r in first] == [replace(r, prompt="") for r in second]
    assert [len(r.prompt.split()) for r in first] == [len(r.prompt.split()) for r in second]
    assert len({" ".join(r.prompt.split()[:4]) for r in first + second}) == 100, "no shared prefixes"
    assert plan(replace(spec, prompt_set=1)) == second, "a set is reproducible"


@pytest.mark.parametrize(
    "bad",
    [
        {"mix": "zipfian"},
        {"arrival": "uniform"},
        {"rate": 0.0},
        {"rate": -math.inf},
        {"burstiness": 0.0},
        {"len_spread": 1.0},
        {"num_adapters": 0},
        {"output_len": 0},
        {"prompt_set": -1},
    ],
)
def test_bad_specs_are_refused_with_the_field_named(bad: dict) -> None:
    with pytest.raises(ValueError, match="|".join(bad)):
        WorkloadSpec(**bad)
