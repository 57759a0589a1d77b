"""Incremental detokenization: turn a growing list of token ids into text deltas that are always
valid UTF-8 (a token that ends mid-character is held back until the character completes). At the end
of the output `flush` releases what is still held back, the unfinished character as U+FFFD, so the
deltas join into the tokenizer's decode of the whole output (as TGI's and vLLM's final text).

Each push decodes only a short window of recent tokens (the prefix/read offsets TGI and vLLM use),
so the cost per token stays constant however long the output grows.

The window starts in the prompt's last few tokens, as in TGI and vLLM: SentencePiece-style tokenizers
(Llama 2, Mistral) drop the space of a word token decoded at the start of a text, so without that
context the first generated token lost its space ("Paris" where the model wrote " Paris").

Decoding never "cleans up tokenization spaces": that English-specific rewrite (" ." -> ".", " !" -> "!")
corrupts what a BPE model wrote ("x != y" -> "x!= y") and, applied to a window, drops characters from the
stream. Llama 3's tokenizer_config asks for it, and transformers 5.0-5.6 obeys (5.7 ignores it for BPE).
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

PROMPT_CONTEXT_TOKENS = 5  # prompt tokens decoded before the first generated one (TGI's and vLLM's 5)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])  # context only, never emitted
        self._prefix_offset = 0  # start of the window decoded for context (spacing depends on it)
        self._read_offset = len(self._ids)  # tokens before this have been emitted (or are the prompt's)
        self.text = ""  # everything emitted so far

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        return self._release(window[len(prefix) :])

    def flush(self) -> str:
        """The text held back (tokens that end mid-character, the character as U+FFFD); call it when
        the output ends, or the stream would lose the last tokens' text."""
        if self._read_offset == len(self._ids):
            return ""
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window = self._decode(self._ids[self._prefix_offset :])
        return self._release(window[len(prefix) :])

    def _release(self, delta: str) -> str:
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
