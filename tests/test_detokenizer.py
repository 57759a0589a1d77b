"""Streamed text against the tokenizer's own decode of the whole sequence, on a SentencePiece-style
tokenizer (Llama 2 and Mistral: a word token decoded at the start of a text loses its space) and on
SmolLM2's byte-level BPE (a character split across tokens)."""

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaTokenizerFast

from loraplex.shard.detokenizer import IncrementalDetokenizer
from loraplex.shard.outputs import OutputProcessor
from loraplex.shard.sampling import SamplingParams

from engine_helpers import feed_until_finish

PROMPT = "The capital of France is"
COMPLETION = " Paris and the cat sat on the mat."


@pytest.fixture(scope="module")
def sentencepiece_tokenizer() -> LlamaTokenizerFast:
    """A small BPE trained here with Llama's Metaspace pre-tokenizer and decoder (no hub access)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(
        [PROMPT + COMPLETION, "Paris is in France.", "the mat, the cat"] * 20, trainer
    )
    return LlamaTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def _split(tokenizer) -> tuple[list[int], list[int]]:
    ids = tokenizer.encode(PROMPT + COMPLETION, add_special_tokens=False)
    prompt = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert ids[: len(prompt)] == prompt
    return prompt, ids[len(prompt) :]


def test_the_first_generated_word_keeps_its_space(sentencepiece_tokenizer):
    """Decoded alone, '▁Paris' is 'Paris': the stream began 'Paris and ...' where vLLM and TGI, which
    decode it after the prompt's last tokens, give ' Paris and ...'."""
    prompt, generated = _split(sentencepiece_tokenizer)
    assert sentencepiece_tokenizer.decode(generated[:1]) == "Paris"  # the trap
    detokenizer = IncrementalDetokenizer(sentencepiece_tokenizer, prompt)
    deltas = [detokenizer.push(token_id) for token_id in generated]
    assert deltas[0] == " Paris"
    assert "".join(deltas) == detokenizer.text == COMPLETION


def test_the_engines_outputs_carry_the_space(sentencepiece_tokenizer):
    prompt, generated = _split(sentencepiece_tokenizer)
    processor = OutputProcessor(
        SamplingParams(max_new_tokens=len(generated), stop=("mat",)),
        sentencepiece_tokenizer,
        frozenset(),
        max_context=1024,
        prompt_ids=prompt,
    )
    text, output = feed_until_finish(processor, prompt, generated)
    assert (text, output.finish_reason) == (" Paris and the cat sat on the ", "stop")
    # the stop string and the rest of its token, which TGI's generated_text keeps
    assert output.stop_text == "mat."


MULTIBYTE = "Sushi 🍣 at 日本語 cafés, then 🦙!"


@pytest.fixture(scope="module")
def byte_level_tokenizer(smollm2_dir):
    """SmolLM2's byte-level BPE: '🍣' and each CJK character span several tokens."""
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.mark.parametrize("end", ["length", "eos", "stop_token"])
def test_an_output_ending_mid_character_keeps_its_text_as_the_whole_decode_does(byte_level_tokenizer, end):
    """A generation that ended on a token holding the first bytes of a character lost the text held
    back for it (and the words before it in the same token): the stream, and the whole response built
    from it, were shorter than the tokenizer's decode of the output, which TGI and vLLM return (the
    unfinished character as U+FFFD)."""
    tokenizer = byte_level_tokenizer
    prompt = tokenizer.encode("Lunch:")
    ids = tokenizer.encode(MULTIBYTE)
    assert any(tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(len(ids)))  # the trap
    stop_token = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for n in range(1, len(ids) + 1):
        generated = (
            ids[:n] if end == "length" else [*ids[:n], tokenizer.eos_token_id if end == "eos" else stop_token]
        )
        processor = OutputProcessor(
            SamplingParams(max_new_tokens=n if end == "length" else n + 1, stop_token_ids=(stop_token,)),
            tokenizer,
            frozenset([tokenizer.eos_token_id]),
            max_context=1024,
            prompt_ids=prompt,
        )
        text, output = feed_until_finish(processor, prompt, generated)
        assert output.finish_reason == {"length": "length", "eos": "eos", "stop_token": "stop"}[end]
        assert text == tokenizer.decode(generated, skip_special_tokens=True), n


def test_a_stop_string_in_text_held_back_mid_character_still_ends_the_output(byte_level_tokenizer):
    """The text released at the end is searched for stop strings like any other."""
    tokenizer = byte_level_tokenizer
    prompt = tokenizer.encode("Lunch:")
    ids = tokenizer.encode(" 🍣")
    assert tokenizer.decode(ids[:1]) == " \ufffd"  # ' ' and the first bytes of '🍣' are one token
    processor = OutputProcessor(
        SamplingParams(max_new_tokens=1, stop=(" ",)),
        tokenizer,
        frozenset([tokenizer.eos_token_id]),
        max_context=1024,
        prompt_ids=prompt,
    )
    text, output = feed_until_finish(processor, prompt, ids[:1])
    assert (text, output.finish_reason, output.stop_text) == ("", "stop", " \ufffd")
