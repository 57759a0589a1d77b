"""The foundation's generation backend: transformers' model forward with our own sampling loop,
one request at a time. The engine issue replaces it with continuous batching over a paged KV cache;
the contract (`generate` yields StepOutput) stays."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from loraplex.shard.detokenizer import IncrementalDetokenizer
from loraplex.shard.lora import LoraAdapter, applied
from loraplex.shard.sampling import SampledToken, SamplingParams, TokenSampler

DEFAULT_MAX_NEW_TOKENS = 256


@dataclass(frozen=True)
class StepOutput:
    token: SampledToken
    text: str  # text released at this step, valid UTF-8, possibly empty
    finish_reason: str | None  # "length" | "stop" | "eos" on the last step
    prompt_logprobs: tuple[float | None, ...] = ()  # first step only, when asked for


class HFBackend:
    def __init__(self, model_dir: Path, device: str = "cpu") -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device = device
        config = self.model.config
        self.max_context = int(config.max_position_embeddings)
        self.vocab_size = int(config.vocab_size)
        eos = self.model.generation_config.eos_token_id
        self.eos_token_ids = frozenset(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    # --- prompts ---------------------------------------------------------------------------------

    def encode_text(self, prompt: str, apply_chat_template: bool) -> list[int]:
        if apply_chat_template:
            return self.encode_chat([("user", prompt)])
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template; send `prompt` instead of `messages`")
        text = self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_token_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if i >= self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt_token_ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})"
            )

    def resolve_max_new_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """The output budget: the request's, or the default, never past the model's context."""
        room = self.max_context - num_prompt_tokens
        if room < 1:
            raise ValueError(
                f"the prompt has {num_prompt_tokens} tokens but the model's context is {self.max_context} "
                "tokens; shorten the prompt"
            )
        if requested is None:
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        if not 1 <= requested <= room:
            raise ValueError(
                f"max_new_tokens must be in 1..{room} (context {self.max_context} minus "
                f"{num_prompt_tokens} prompt tokens), got {requested}"
            )
        return requested

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def is_special(self, token_id: int) -> bool:
        return token_id in self.tokenizer.all_special_ids

    # --- generation ------------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cancelled: threading.Event,
        want_prompt_logprobs: bool = False,
        adapter: LoraAdapter | None = None,
    ) -> Iterator[StepOutput]:
        """Yield one StepOutput per generated token until a finish reason or cancellation."""
        with applied(self.model, adapter):
            yield from self._generate(prompt_ids, params, cancelled, want_prompt_logprobs)

    def _generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        cancelled: threading.Event,
        want_prompt_logprobs: bool,
    ) -> Iterator[StepOutput]:
        sampler = TokenSampler(params)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stop_token_ids = set(params.stop_token_ids)
        holdback = max((len(s) for s in params.stop), default=1) - 1
        context = list(prompt_ids)
        cache = DynamicCache()
        pending = ""  # text decoded but not yet released, kept to match stop strings across tokens
        next_input = torch.tensor([prompt_ids], device=self.device)  # [1, S]
        for step in range(params.max_new_tokens):
            logits = self.model(input_ids=next_input, past_key_values=cache, use_cache=True).logits
            prompt_logprobs = (
                _prompt_logprobs(logits[0], prompt_ids) if step == 0 and want_prompt_logprobs else ()
            )
            token = sampler.choose(logits[0, -1], context)
            context.append(token.token_id)
            finish = None
            if token.token_id in self.eos_token_ids and not params.ignore_eos:
                finish = "eos"
            elif token.token_id in stop_token_ids:
                finish = "stop"
            else:
                pending += detokenizer.push(token.token_id)
                cut = _first_stop(pending, params.stop)
                if cut is not None:
                    pending, finish = pending[:cut], "stop"
            if finish is None and (step == params.max_new_tokens - 1 or len(context) >= self.max_context):
                finish = "length"
            release_upto = len(pending) if finish else max(0, len(pending) - holdback)
            released, pending = pending[:release_upto], pending[release_upto:]
            yield StepOutput(token, released, finish, prompt_logprobs)
            if finish or cancelled.is_set():
                return
            next_input = torch.tensor([[token.token_id]], device=self.device)


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    hits = [index for index in (text.find(stop) for stop in stops) if index >= 0]
    return min(hits) if hits else None


def _prompt_logprobs(logits: torch.Tensor, prompt_ids: list[int]) -> tuple[float | None, ...]:
    """logits: [S, vocab] of the prefill. The first prompt token has no log-prob (nothing precedes it)."""
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [S-1, vocab]
    targets = torch.tensor(prompt_ids[1:], dtype=torch.long)
    picked = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    return (None, *picked)
