"""Per-request output processing: sample the next token, detokenize, apply stop conditions.

Runs on the engine thread after each model step; the result is a plain `TokenOutput` that the
service turns into protobuf.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from transformers import PreTrainedTokenizerBase

from loraplex.shard.detokenizer import IncrementalDetokenizer
from loraplex.shard.sampling import SampledToken, SamplingParams, TokenSampler
from loraplex.shard.sequence import SequenceTimes


@dataclass(frozen=True)
class TokenOutput:
    token: SampledToken
    text: str  # text released at this step, valid UTF-8, possibly empty
    finish_reason: str | None  # "length" | "stop" | "eos" on the last token
    num_prompt_tokens: int
    num_generated: int
    prompt_logprobs: tuple[float | None, ...] = ()  # with the first token, when asked for
    stop_text: str = ""  # finished by a stop string: the text it cut off, the stop string first
    # with the last token (finish_reason set); measurements, so not part of equality
    times: SequenceTimes | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RequestFailed:
    """The engine dropped the request: `reason` is "deadline", "error", or "unavailable" (the shard
    lost a tensor-parallel rank or its engine is stuck, and it is going down; the request may be
    retried elsewhere); `message` says why."""

    reason: str
    message: str
    times: SequenceTimes | None = field(default=None, compare=False)


class OutputProcessor:
    """eos_token_ids are the model's (config.json and generation_config.json); the tokenizer's eos is
    added, as vLLM does: a fine-tune may end its turns with a token only its tokenizer names (Llama 3's
    <|eot_id|> under a config that lists <|end_of_text|>), and would otherwise run to max_new_tokens."""

    def __init__(
        self,
        params: SamplingParams,
        tokenizer: PreTrainedTokenizerBase,
        eos_token_ids: frozenset[int],
        max_context: int,
        want_prompt_logprobs: bool = False,
        prompt_ids: Sequence[int] = (),
    ) -> None:
        self.params = params
        self.sampler = TokenSampler(params)
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
        self._eos = frozenset() if params.ignore_eos else eos_token_ids | _eos_ids(tokenizer)
        self._stop_ids = frozenset(params.stop_token_ids)
        self._holdback = max((len(s) for s in params.stop), default=1) - 1
        self._pending = ""  # decoded text not yet released, kept to match stop strings across tokens
        self._max_context = max_context
        self._want_prompt_logprobs = want_prompt_logprobs
        self.prompt_logprobs: list[float | None] = [None]  # the first prompt token has none

    def process(self, token: SampledToken, token_ids: list[int], num_prompt_tokens: int) -> TokenOutput:
        """token has just been appended to token_ids; decide what to release and whether to stop."""
        num_generated = len(token_ids) - num_prompt_tokens
        stop_text = ""
        finish: str | None = None
        if token.token_id in self._eos:  # the text leaves eos and stop tokens out
            finish = "eos"
        elif token.token_id in self._stop_ids:
            finish = "stop"
        else:
            self._pending += self._detokenizer.push(token.token_id)
            if num_generated >= self.params.max_new_tokens or len(token_ids) >= self._max_context:
                finish = "length"
        if finish is not None:  # the text held back mid-character ends the output, as U+FFFD
            self._pending += self._detokenizer.flush()
        cut = _first_stop(self._pending, self.params.stop)
        if cut is not None:
            self._pending, stop_text, finish = self._pending[:cut], self._pending[cut:], "stop"
        release_upto = len(self._pending) if finish else max(0, len(self._pending) - self._holdback)
        released, self._pending = self._pending[:release_upto], self._pending[release_upto:]
        first = num_generated == 1 and self._want_prompt_logprobs
        prompt_logprobs = tuple(self.prompt_logprobs) if first else ()
        return TokenOutput(
            token, released, finish, num_prompt_tokens, num_generated, prompt_logprobs, stop_text
        )


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(hits) if hits else None


def _eos_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    return frozenset() if tokenizer.eos_token_id is None else frozenset([tokenizer.eos_token_id])
