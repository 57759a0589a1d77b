"""A request that does not fit a shard's context: the message the shard sends, and its parse. The
gateway reads the parse to answer as the caller's client expects (OpenAI's `context_length_exceeded`,
TGI's validation error), which client libraries recognise to trim and retry. Free of torch, so the
gateway imports it."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PROMPT_TOO_LONG = re.compile(
    r"the prompt has (\d+) tokens but this shard's context is (\d+) tokens; shorten the prompt"
)
_BUDGET_TOO_LARGE = re.compile(
    r"max_new_tokens must be at most (\d+) \(context (\d+) minus (\d+) prompt tokens\), got (\d+)"
)


@dataclass(frozen=True)
class ContextExceeded:
    max_context: int
    prompt_tokens: int
    max_new_tokens: int | None = None  # None: the prompt alone leaves no room for a token

    def message(self) -> str:
        """What a gRPC caller is told."""
        if self.max_new_tokens is None:
            return (
                f"the prompt has {self.prompt_tokens} tokens but this shard's context is "
                f"{self.max_context} tokens; shorten the prompt"
            )
        return (
            f"max_new_tokens must be at most {self.max_context - self.prompt_tokens} (context "
            f"{self.max_context} minus {self.prompt_tokens} prompt tokens), got {self.max_new_tokens}"
        )

    @classmethod
    def parse(cls, message: str) -> ContextExceeded | None:
        """The figures in a message `message()` wrote (None for any other message)."""
        if match := _PROMPT_TOO_LONG.fullmatch(message):
            prompt_tokens, max_context = map(int, match.groups())
            return cls(max_context, prompt_tokens)
        if match := _BUDGET_TOO_LARGE.fullmatch(message):
            _, max_context, prompt_tokens, max_new_tokens = map(int, match.groups())
            return cls(max_context, prompt_tokens, max_new_tokens)
        return None
