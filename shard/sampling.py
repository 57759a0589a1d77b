"""Sampling parameters and next-token choice for one sequence.

Log-probs are those of the model's raw distribution (before temperature, top-k/p and penalties), as
vLLM and OpenAI report them.

The parameters are checked (sampling_limits.check_sampling) so that finite logits always give finite
scores: a NaN or infinite score would make `torch.multinomial` raise in the middle of an engine step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from loraplex.shard.sampling_limits import check_sampling

# Temperatures below this sample greedily, as in vLLM (_SAMPLING_EPS): dividing logits by a tinier
# one overflows fp32 to inf, and the distribution is a point mass on the argmax anyway.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        check_sampling(**vars(self))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob) alternatives, best first


class TokenSampler:
    """Chooses tokens for one sequence; owns that sequence's random generator so a seeded request
    gives the same tokens whatever else the server is doing."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        # torch takes seeds in [-2**63, 2**64) and seeds n and n mod 2**64 alike: any integer works
        self._generator = torch.Generator().manual_seed(seed % 2**64)

    def choose(self, logits: torch.Tensor, context_ids: list[int]) -> SampledToken:
        """logits: [vocab] for the next position; context_ids: prompt + generated ids so far."""
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        scores = self._penalize(logits, context_ids)
        token_id = int(torch.argmax(scores)) if self.params.greedy else self._sample(scores)
        top: tuple[tuple[int, float], ...] = ()
        if self.params.top_logprobs:
            values, ids = torch.topk(logprobs, self.params.top_logprobs)
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return SampledToken(token_id=token_id, logprob=float(logprobs[token_id]), top=top)

    def _penalize(self, logits: torch.Tensor, context_ids: list[int]) -> torch.Tensor:
        penalty = self.params.repetition_penalty
        if penalty == 1.0 or not context_ids:
            return logits
        ids = torch.tensor(sorted(set(context_ids)), dtype=torch.long)
        seen = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
        return logits

    def _sample(self, scores: torch.Tensor) -> int:
        scores = scores / self.params.temperature
        if self.params.top_k and self.params.top_k < scores.numel():
            kth = torch.topk(scores, self.params.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        if self.params.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= self.params.top_p
            sorted_probs = sorted_probs.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator))
