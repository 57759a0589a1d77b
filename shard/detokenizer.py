"""Incremental detokenization: turn a growing list of token ids into text deltas that are always
valid UTF-8 (a token that ends mid-character is held back until the character completes)."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        decoded = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if decoded.endswith("\ufffd") or not decoded.startswith(self.text):
            return ""
        delta = decoded[len(self.text) :]
        self.text = decoded
        return delta
