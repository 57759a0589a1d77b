"""Open-loop serving workloads: when each request arrives, which adapter it names, how long its prompt
and answer are. Everything is drawn from one seed, so two systems (adapters and base only) and several
offered rates see the same requests: arrivals, adapters and lengths come from separate streams of the
seed, and a rate only stretches or squeezes the gaps. The prompts' words come from the seed and a
prompt set: runs against one server take a set each, so that no run finds an earlier run's prompts in
the prefix cache (same lengths, other words, so the same work).

Arrivals are Poisson (exponential gaps) or Gamma, whose shape sets the burstiness (below 1 burstier
than Poisson, above 1 smoother, 1 is Poisson), as vLLM's serving benchmark draws them. Adapter mixes
are Punica's: distinct (the adapters in turn, so no two neighbours share one), uniform, skewed
(Zipf, exponent 1.5) and identical (one adapter for all), plus zipf with any exponent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ARRIVALS = ("poisson", "gamma")
MIXES = ("distinct", "uniform", "zipf", "skewed", "identical")
SKEWED_ALPHA = 1.5  # Punica's skewed popularity
# Common English words: one token each for the Llama-family tokenizers, so a prompt of n words is about
# n tokens (the report counts the real number from each response's usage).
_WORDS_TEXT = (
    "the of and to in is was for on that with as by at from his her they this which or had not are but "
    "one all were when there can an been has more will who would their what so up out if about into time "
    "only other new some could these two may then do first any my now such like our over man me even most "
    "made after also did many before must through back years where much your way well down should because "
    "each just those people how too little state good very make world still own see men work long get "
    "here between both life being under never day same another know while last might us great old year "
    "off come since against go came right used take three house water city story"
)
WORDS = tuple(_WORDS_TEXT.split())


@dataclass(frozen=True)
class WorkloadSpec:
    num_requests: int = 100
    rate: float = math.inf  # offered requests/s; inf sends every request at once
    arrival: str = "poisson"
    burstiness: float = 1.0  # the Gamma shape (arrival="gamma")
    mix: str = "zipf"
    alpha: float = 1.0  # the zipf mix's exponent
    num_adapters: int = 100
    input_len: int = 128  # prompt words (about as many tokens)
    output_len: int = 64  # tokens generated, EOS ignored
    len_spread: float = 0.0  # lengths uniform in [len * (1 - spread), len * (1 + spread)]
    seed: int = 0
    prompt_set: int = 0  # which words fill the prompts; all else is the same across sets

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, not {self.arrival!r}")
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {MIXES}, not {self.mix!r}")
        if not self.rate > 0 or not self.burstiness > 0:
            raise ValueError("rate and burstiness must be > 0 (rate may be inf)")
        if not 0 <= self.len_spread < 1:
            raise ValueError(f"len_spread must be in [0, 1), not {self.len_spread}")
        if min(self.num_requests, self.num_adapters, self.input_len, self.output_len) < 1:
            raise ValueError("num_requests, num_adapters, input_len and output_len must be >= 1")
        if self.prompt_set < 0:
            raise ValueError(f"prompt_set must be >= 0, not {self.prompt_set}")


@dataclass(frozen=True)
class PlannedRequest:
    at_s: float  # when to send it, from the run's start
    adapter: int | None  # index into the run's adapters; None: the base model
    prompt: str
    max_new_tokens: int


def plan(spec: WorkloadSpec) -> list[PlannedRequest]:
    """The workload's requests in arrival order."""
    arrivals_seed, adapters_seed, lengths_seed = np.random.SeedSequence(spec.seed).spawn(3)
    words_seed = np.random.SeedSequence([spec.seed, spec.prompt_set])
    at = arrival_times(np.random.default_rng(arrivals_seed), spec)
    adapters = adapter_choices(
        np.random.default_rng(adapters_seed), spec.mix, spec.num_adapters, spec.num_requests, spec.alpha
    )
    lengths_rng = np.random.default_rng(lengths_seed)
    input_lens = _lengths(lengths_rng, spec.input_len, spec.len_spread, spec.num_requests)
    output_lens = _lengths(lengths_rng, spec.output_len, spec.len_spread, spec.num_requests)
    words_rng = np.random.default_rng(words_seed)
    return [
        PlannedRequest(float(at[i]), adapters[i], _prompt(words_rng, int(input_lens[i])), int(output_lens[i]))
        for i in range(spec.num_requests)
    ]


def base_only(requests: list[PlannedRequest]) -> list[PlannedRequest]:
    """The same requests with no adapter: the baseline a run with adapters is compared against."""
    return [PlannedRequest(r.at_s, None, r.prompt, r.max_new_tokens) for r in requests]


def arrival_times(rng: np.random.Generator, spec: WorkloadSpec) -> np.ndarray:
    """Send times in seconds: cumulative gaps of mean 1/rate, the first request at 0."""
    if math.isinf(spec.rate):
        return np.zeros(spec.num_requests)
    if spec.arrival == "poisson":
        gaps = rng.exponential(1.0 / spec.rate, spec.num_requests)
    else:  # Gamma(shape k, scale 1/(k rate)) has mean 1/rate and coefficient of variation 1/sqrt(k)
        gaps = rng.gamma(spec.burstiness, 1.0 / (spec.burstiness * spec.rate), spec.num_requests)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def adapter_choices(
    rng: np.random.Generator, mix: str, num_adapters: int, num_requests: int, alpha: float = 1.0
) -> list[int]:
    """Each request's adapter index; under zipf and skewed index i (0 = most popular) has probability
    proportional to 1/(i+1)^alpha."""
    if mix == "distinct":
        return [i % num_adapters for i in range(num_requests)]
    if mix == "identical":
        return [0] * num_requests
    if mix == "uniform":
        return rng.integers(0, num_adapters, num_requests).tolist()
    exponent = SKEWED_ALPHA if mix == "skewed" else alpha
    weights = 1.0 / np.arange(1, num_adapters + 1, dtype=np.float64) ** exponent
    return rng.choice(num_adapters, size=num_requests, p=weights / weights.sum()).tolist()


def _lengths(rng: np.random.Generator, mean: int, spread: float, count: int) -> np.ndarray:
    low, high = max(1, round(mean * (1 - spread))), max(1, round(mean * (1 + spread)))
    return rng.integers(low, high + 1, count)


def _prompt(rng: np.random.Generator, num_words: int) -> str:
    """Random words, so that prompts share no prefix (prefix caching would flatter the figures)."""
    return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), num_words))
