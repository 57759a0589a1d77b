"""Turn request inputs into prompt token ids and check them against the model's limits."""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer

from loraplex.shard.context_limits import ContextExceeded

DEFAULT_MAX_NEW_TOKENS = 256


class PromptEncoder:
    def __init__(self, model_dir: Path, vocab_size: int, max_context: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = vocab_size
        self.max_context = max_context
        self._special_ids = frozenset(self.tokenizer.all_special_ids)

    def encode_text(self, prompt: str, apply_chat_template: bool) -> list[int]:
        if apply_chat_template:
            return self.encode_chat([("user", prompt)])
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise ValueError("this model has no chat template; send `prompt` instead of `messages`")
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=True,
                tokenize=False,
            )
        except TemplateError as error:  # raise_exception in the template: the caller's messages, not a bug
            raise ValueError(f"the model's chat template refused these messages: {error}") from error
        return self.tokenizer.encode(text, add_special_tokens=False)

    def check_token_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"prompt_token_ids {bad[:5]} are outside the vocabulary (size {self.vocab_size})"
            )

    def resolve_max_new_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """The output budget: the request's, or the default, never past the context."""
        room = self.max_context - num_prompt_tokens
        if room < 1:
            raise ValueError(ContextExceeded(self.max_context, num_prompt_tokens).message())
        if requested is None:
            return min(DEFAULT_MAX_NEW_TOKENS, room)
        if requested < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {requested}")
        if requested > room:
            raise ValueError(ContextExceeded(self.max_context, num_prompt_tokens, requested).message())
        return requested

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids
