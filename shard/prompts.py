"""Turn request inputs into prompt token ids and check them against the model's limits."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

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
        text = self.tokenizer.apply_chat_template(
            [{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=True,
            tokenize=False,
        )
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
            raise ValueError(too_long(num_prompt_tokens, self.max_context))
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
        return token_id in self._special_ids


def too_long(num_prompt_tokens: int, max_context: int) -> str:
    """What a caller is told when its prompt leaves no room in the shard's context."""
    return (
        f"the prompt has {num_prompt_tokens} tokens but this shard's context is {max_context} tokens; "
        "shorten the prompt"
    )
