"""Prompt tokens, streamed text, token texts and end-of-sequence on tokenizers shaped like those of the
families we serve (the rest of the suite runs on SmolLM2's), each built here with the `tokenizers`
library (no hub access) and loaded through AutoTokenizer as the shard loads them; transformers is the
reference:

- llama2: SentencePiece-style BPE with byte fallback (<0xE2> tokens), '▁' for spaces, a decoder that
  drops the first word's space, BOS added by the post-processor (Llama 2, Mistral v0.1/v0.2);
- llama3: byte-level BPE, BOS <|begin_of_text|> added by the post-processor and in the chat template,
  eos <|eot_id|>, further special tokens (<|start_header_id|>) that no special-token attribute names;
- qwen2: byte-level BPE without BOS, ChatML chat template (Qwen2; SmolLM2 is alike).
"""

import json
from pathlib import Path

import pytest
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from loraplex.shard.detokenizer import IncrementalDetokenizer
from loraplex.shard.outputs import OutputProcessor
from loraplex.shard.prompts import PromptEncoder
from loraplex.shard.sampling import SampledToken, SamplingParams

from engine_helpers import feed_until_finish

CORPUS = [
    "The capital of France is Paris and the cat sat on the mat.",
    "Paris is in France, the mat is matte.",
    "Hello world! How are you? Is x != y , or is it ?",
]
PROMPT = "The capital of France is"
COMPLETIONS = [
    " Paris and the cat sat on the mat.",
    " Paris ☃, 日本語 and naïve\n\n  the cat",  # characters the vocabularies spell byte by byte
    "n't Paris",  # the prompt ends mid-word
]
VOCAB_SIZE = 400  # what the trainers aim at; the byte-level ones stop short on this corpus
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]

LLAMA2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'].strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def _write(out: Path, tokenizer: Tokenizer, config: dict, keep_added: tuple[str, ...] = ()) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    data = json.loads(tokenizer.to_str())
    if keep_added:  # the trainer adds its special tokens as added tokens; Llama's byte tokens are vocabulary
        data["added_tokens"] = [token for token in data["added_tokens"] if token["content"] in keep_added]
    (out / "tokenizer.json").write_text(json.dumps(data))
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _llama2(out: Path) -> Path:
    """As Llama 2's tokenizer.json: '▁'-prefixed words, <0xNN> byte fallback, <s> from the post-processor."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=["<unk>", "<s>", "</s>", *BYTE_TOKENS]
    )
    tokenizer.train_from_iterator(CORPUS * 20, trainer)
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = None
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "legacy": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": LLAMA2_TEMPLATE,
    }
    return _write(out, tokenizer, config, keep_added=("<unk>", "<s>", "</s>"))


def _byte_level(specials: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tokenizer.train_from_iterator(
        CORPUS * 20, trainers.BpeTrainer(vocab_size=VOCAB_SIZE, initial_alphabet=alphabet)
    )
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    return tokenizer


def _llama3(out: Path, **config_overrides: object) -> Path:
    tokenizer = _byte_level(LLAMA3_SPECIALS)
    bos = ("<|begin_of_text|>", tokenizer.token_to_id("<|begin_of_text|>"))
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[bos],
            ),
        ]
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "clean_up_tokenization_spaces": True,  # as in every Llama 3 repository
        "chat_template": LLAMA3_TEMPLATE,
        **config_overrides,
    }
    return _write(out, tokenizer, config)


def _qwen2(out: Path) -> Path:
    tokenizer = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    config = {
        "tokenizer_class": "Qwen2Tokenizer",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "chat_template": QWEN2_TEMPLATE,
    }
    return _write(out, tokenizer, config)


FAMILIES = {"llama2": _llama2, "llama3": _llama3, "qwen2": _qwen2}
ADDS_BOS = {"llama2", "llama3"}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family(request, tmp_path_factory) -> tuple[str, PromptEncoder]:
    model_dir = FAMILIES[request.param](tmp_path_factory.mktemp(request.param))
    return request.param, PromptEncoder(model_dir, vocab_size=VOCAB_SIZE, max_context=4096)


@pytest.fixture(scope="module")
def llama2(tmp_path_factory) -> PromptEncoder:
    return PromptEncoder(_llama2(tmp_path_factory.mktemp("llama2")), vocab_size=VOCAB_SIZE, max_context=4096)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory) -> PromptEncoder:
    return PromptEncoder(_llama3(tmp_path_factory.mktemp("llama3")), vocab_size=VOCAB_SIZE, max_context=4096)


def _split(tokenizer, completion: str) -> tuple[list[int], list[int]]:
    """The prompt's ids (with BOS where the family adds one) and the completion's, as the model wrote it."""
    prompt = tokenizer.encode(PROMPT)
    ids = tokenizer.encode(PROMPT + completion)
    assert ids[: len(prompt)] == prompt
    return prompt, ids[len(prompt) :]


def test_a_text_prompt_has_one_bos_where_the_family_adds_one_as_transformers(family):
    name, prompts = family
    tokenizer = prompts.tokenizer
    ids = prompts.encode_text(PROMPT, apply_chat_template=False)
    assert ids == tokenizer(PROMPT)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == (1 if name in ADDS_BOS else 0)
    assert (ids[0] == tokenizer.bos_token_id) == (name in ADDS_BOS)


def test_a_chat_prompt_is_what_transformers_apply_chat_template_gives(family):
    """The templates of Llama 2 and 3 write the BOS themselves: encoding the rendered text must not
    add a second one."""
    name, prompts = family
    tokenizer = prompts.tokenizer
    ids = prompts.encode_text(PROMPT, apply_chat_template=True)
    reference = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True, tokenize=True
    )["input_ids"]
    assert ids == list(reference)
    assert ids.count(tokenizer.bos_token_id) == (1 if name in ADDS_BOS else 0)


@pytest.mark.parametrize("completion", COMPLETIONS)
def test_streamed_text_is_the_decode_of_the_whole_sequence_after_the_prompt(family, completion):
    """Token by token, characters spelled over several byte tokens arrive whole (never a U+FFFD), and
    the pieces join into what decoding prompt and output together gives after the prompt's text."""
    _, prompts = family
    tokenizer = prompts.tokenizer
    prompt, generated = _split(tokenizer, completion)
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detokenizer.push(token_id) for token_id in generated]
    whole = tokenizer.decode(prompt + generated, skip_special_tokens=True)
    assert "".join(deltas) == whole[len(tokenizer.decode(prompt, skip_special_tokens=True)) :]
    assert "".join(deltas) == completion
    assert not any("\ufffd" in delta for delta in deltas)


def test_a_stop_string_spelled_over_byte_tokens_ends_the_text_before_it(llama2):
    tokenizer = llama2.tokenizer
    prompt, generated = _split(tokenizer, COMPLETIONS[1])
    assert {"<0xE2>", "<0x98>", "<0x83>"} <= set(tokenizer.convert_ids_to_tokens(generated))  # the snowman
    params = SamplingParams(max_new_tokens=64, stop=("☃,",))
    processor = OutputProcessor(params, tokenizer, frozenset(), 4096, prompt_ids=prompt)
    text, output = feed_until_finish(processor, prompt, generated)
    assert (text, output.finish_reason) == (" Paris ", "stop")


def test_a_sentencepiece_word_tokens_text_keeps_its_space(llama2):
    """Decoded alone, '▁Paris' is 'Paris': the logprobs' and TGI details' token texts lost every word's
    space (vLLM gives ' Paris'), so they no longer joined into the text."""
    ids = llama2.tokenizer.encode(" Paris is", add_special_tokens=False)
    assert llama2.tokenizer.convert_ids_to_tokens(ids) == ["▁Paris", "▁is"]
    assert [llama2.token_text(i) for i in ids] == [" Paris", " is"]


def test_distinct_tokens_have_distinct_texts(llama2):
    """'▁mat' and 'mat' both decode alone to 'mat': as keys of the completions API's top_logprobs
    they collided, and one log-prob overwrote the other."""
    vocab = llama2.tokenizer.get_vocab()
    assert "▁mat" in vocab and "mat" in vocab
    assert (llama2.token_text(vocab["▁mat"]), llama2.token_text(vocab["mat"])) == (" mat", "mat")


def test_word_token_texts_join_into_the_text(family):
    """What TGI's generated_text and an echoed token prompt are built from, on every family."""
    _, prompts = family
    _, generated = _split(prompts.tokenizer, COMPLETIONS[0])
    assert "".join(prompts.token_text(i) for i in generated) == COMPLETIONS[0]
    special = prompts.tokenizer.all_special_ids[0]
    assert prompts.token_text(special) == prompts.tokenizer.convert_ids_to_tokens(special)


def test_tokens_the_text_leaves_out_are_special(llama3):
    """Llama 3 names only its BOS and eos as special tokens; decoding drops <|start_header_id|> and
    <|end_of_text|> as well, so `special` must say so (TGI's generated_text is joined from the tokens
    that are not special)."""
    tokenizer = llama3.tokenizer
    ids = tokenizer.encode("Hello<|start_header_id|>world<|end_of_text|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Helloworld"
    names = tokenizer.convert_ids_to_tokens(ids)
    assert [name for name, i in zip(names, ids, strict=True) if llama3.is_special(i)] == [
        "<|start_header_id|>",
        "<|end_of_text|>",
    ]


def test_the_tokenizers_eos_ends_generation_when_the_model_config_names_another(llama3):
    """A Llama 3 fine-tune whose config lists <|end_of_text|> but whose tokenizer (and chat template)
    ends turns with <|eot_id|>: vLLM stops at the tokenizer's eos too; the shard ran to max_new_tokens."""
    tokenizer = llama3.tokenizer
    config_eos = frozenset([tokenizer.convert_tokens_to_ids("<|end_of_text|>")])
    prompt = tokenizer.encode(PROMPT)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert eot == tokenizer.eos_token_id and eot not in config_eos
    output = OutputProcessor(SamplingParams(max_new_tokens=8), tokenizer, config_eos, 4096).process(
        SampledToken(eot, 0.0, ()), [*prompt, eot], len(prompt)
    )
    assert (output.finish_reason, output.text) == ("eos", "")
    ignoring = OutputProcessor(SamplingParams(max_new_tokens=8, ignore_eos=True), tokenizer, config_eos, 4096)
    assert ignoring.process(SampledToken(eot, 0.0, ()), [*prompt, eot], len(prompt)).finish_reason is None


def test_text_is_never_cleaned_up_though_the_tokenizer_config_asks(tmp_path):
    """Llama 3's tokenizer_config sets clean_up_tokenization_spaces, which transformers 5.0-5.6 applied
    to every decode: 'x != y' read 'x!= y', and the stream, decoding windows, lost '!' ',' '?' outright
    (' x = y  and is it '). The escape hatch makes this transformers do the same; vLLM never cleans up."""
    bpe_cleanup = {"clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output": True}
    prompts = PromptEncoder(_llama3(tmp_path, **bpe_cleanup), vocab_size=VOCAB_SIZE, max_context=4096)
    completion = " x != y , and is it ?"
    prompt, generated = _split(prompts.tokenizer, completion)
    assert prompts.tokenizer.decode(generated) != completion  # the clean-up is on
    detokenizer = IncrementalDetokenizer(prompts.tokenizer, prompt)
    assert "".join(detokenizer.push(token_id) for token_id in generated) == completion
    assert "".join(prompts.token_text(token_id) for token_id in generated) == completion
