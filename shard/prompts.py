"""Turn request inputs into prompt token ids and check them against the model's limits."""

from __future__ import annotations

from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraplex.shard.context_limits import ContextExceeded

DEFAULT_MAX_NEW_TOKENS = 256
SENTENCEPIECE_SPACE = "\u2581"  # '▁', a word's leading space in SentencePiece-style vocabularies


class PromptEncoder:
    def __init__(self, model_dir: Path, vocab_size: int, max_context: int) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vocab_size = vocab_size
        self.max_context = max_context
        self._special_ids = _special_ids(self.tokenizer)

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
        """The token's text as it reads inside a text. A SentencePiece-style decoder (Llama 2, Mistral)
        drops the leading space of a text's first word, so '▁Paris' decoded alone is 'Paris'; the space is
        put back, as vLLM does, so that token texts join into the text and '▁true' and 'true' differ.
        No clean-up of tokenization spaces, which would make ' .' read '.' (see detokenizer.py)."""
        text = self.tokenizer.decode([token_id], clean_up_tokenization_spaces=False)
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if not piece or token_id in self._special_ids:
            return text
        num_spaces = len(piece) - len(piece.lstrip(SENTENCEPIECE_SPACE))
        missing = num_spaces - (len(text) - len(text.lstrip(" ")))
        return " " * missing + text if missing > 0 else text

    def is_special(self, token_id: int) -> bool:
        """Whether the text leaves the token out (decoding skips special tokens)."""
        return token_id in self._special_ids


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The named special tokens and every added token marked special, which decoding with
    skip_special_tokens also drops: Llama 3's <|start_header_id|> and <|end_of_text|> are not named
    (all_special_ids leaves them out) yet are missing from the text all the same."""
    added = (i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return frozenset(tokenizer.all_special_ids).union(added)
