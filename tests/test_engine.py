"""The engine on the real SmolLM2 weights, against transformers on the same weights."""

import random
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.shard.detokenizer import IncrementalDetokenizer
from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.outputs import RequestFailed
from loraplex.shard.sampling import SamplingParams

from engine_helpers import (
    engine_last_logits,
    greedy_requests,
    reference_greedy,
    reference_last_logits,
    tokens,
)
from peft_fixtures import write_peft_adapter

# fp32 on CPU in a different operation order (fused projections, paged attention, batched rows):
# logits agree to ~5e-5 at magnitudes of ~25.
LOGIT_ATOL = 5e-4  # measured: <= 6e-5
LOGIT_RTOL = 0.0

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain gravity to a child in one sentence.",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "What is 12 times 12?",
    "Name a planet with rings.",
    "Translate 'good morning' to Spanish.",
    "What colour is the sky on a clear day?",
    "Describe a cat in five words.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet goldfish.",
    "What does a bee make?",
    "Summarise the plot of Cinderella in one sentence.",
    "How many legs does a spider have?",
]
LONG_TEXT = " ".join(f"Fact {i}: the number {i} squared is {i * i}." for i in range(60))


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    # A small step budget, so long prompts are prefilled in chunks beside other sequences' decodes.
    return Engine(smollm2_dir, EngineConfig(kv_cache_bytes=256 << 20, max_batch_tokens=256))


@pytest.fixture(scope="module")
def reference(smollm2_dir):
    return AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


def _mixed_prompts(engine) -> list[list[int]]:
    """20 prompts from 5 to ~1000 tokens: chat and raw, short and long enough to need several chunks."""
    encode = engine.prompts.encode_text
    prompts = [encode(question, True) for question in QUESTIONS]
    prompts += [encode("Once upon a time", False), encode("def fibonacci(n):", False)]
    prompts += [
        encode(LONG_TEXT[:1500] + " What is 7 squared?", True),
        encode(LONG_TEXT + " Summarise.", True),
    ]
    return prompts


def test_concurrent_greedy_output_equals_transformers_token_for_token(engine, reference):
    prompts = _mixed_prompts(engine)
    assert len(prompts) >= 20 and max(map(len, prompts)) > 2 * engine.scheduler.max_batch_tokens
    hits_before = engine.stats.num_prefix_hit_tokens
    outputs = engine.generate(greedy_requests(prompts, max_new_tokens=12))
    for i, prompt_ids in enumerate(prompts):
        assert tokens(outputs[f"r{i}"]) == reference_greedy(reference, prompt_ids, 12), f"prompt {i}"
    assert engine.stats.num_prefix_hit_tokens > hits_before  # the chat template's system prompt is shared


def test_a_repeated_prompt_is_served_from_the_prefix_cache_with_the_same_tokens(engine):
    prompt = engine.prompts.encode_text(LONG_TEXT[:400] + " What is 3 squared?", True)
    first = tokens(engine.generate(greedy_requests([prompt], 12))["r0"])
    hits_before = engine.stats.num_prefix_hit_tokens
    again = tokens(engine.generate(greedy_requests([prompt], 12))["r0"])
    block_size = engine.blocks.block_size
    assert engine.stats.num_prefix_hit_tokens - hits_before == (len(prompt) - 1) // block_size * block_size
    assert again == first


def test_last_step_logits_match_transformers_within_tolerance(engine, reference):
    prompts = _mixed_prompts(engine)[::3]
    next_tokens = [42, 1000, 7, 49000, 300, 2, 17][: len(prompts)]
    ours = engine_last_logits(engine, prompts, next_tokens)
    for prompt_ids, token, logits in zip(prompts, next_tokens, ours, strict=True):
        expected = reference_last_logits(reference, prompt_ids, token)
        torch.testing.assert_close(logits, expected, atol=LOGIT_ATOL, rtol=LOGIT_RTOL)


def test_capital_of_france_mentions_paris_and_ends_with_eos(engine):
    outputs = engine.generate(greedy_requests([engine.prompts.encode_text(QUESTIONS[0], True)], 24))["r0"]
    assert "Paris" in "".join(output.text for output in outputs)
    assert outputs[-1].finish_reason == "eos"
    assert outputs[-1].num_generated == len(outputs)


def test_seeded_sampling_is_reproducible_whatever_else_is_in_the_batch(engine):
    params = SamplingParams(max_new_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    prompt = engine.prompts.encode_text("Tell me a story about a dragon.", True)
    alone = tokens(engine.generate([EngineRequest("seeded", prompt, params)])["seeded"])
    others = [
        EngineRequest(
            f"other{i}",
            engine.prompts.encode_text(q, True),
            SamplingParams(max_new_tokens=20, temperature=1.0),
        )
        for i, q in enumerate(QUESTIONS[:8])
    ]
    crowded = engine.generate([*others[:4], EngineRequest("seeded", prompt, params), *others[4:]])
    assert tokens(crowded["seeded"]) == alone
    other_seed = engine.generate(
        [EngineRequest("s", prompt, SamplingParams(**{**params.__dict__, "seed": 99}))]
    )
    assert tokens(other_seed["s"]) != alone


def test_repetition_penalty_matches_transformers(engine, reference):
    prompt = engine.prompts.encode_text("Repeat after me: the cat sat on the mat.", True)
    outputs = engine.generate(greedy_requests([prompt], 16, repetition_penalty=1.3))["r0"]
    assert tokens(outputs) == reference_greedy(reference, prompt, 16, repetition_penalty=1.3)


def test_prompt_and_token_logprobs_match_the_reference_forward(engine, reference):
    prompt = engine.prompts.encode_text("The quick brown fox jumps over the lazy dog", False)
    request = EngineRequest(
        "p", prompt, SamplingParams(max_new_tokens=1, top_logprobs=5), want_prompt_logprobs=True
    )
    first = engine.generate([request])["p"][0]
    with torch.no_grad():
        logits = reference(torch.tensor([prompt])).logits[0].float()
    logprobs = torch.log_softmax(logits, -1)
    expected = logprobs[:-1].gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(prompt)
    torch.testing.assert_close(torch.tensor(first.prompt_logprobs[1:]), expected, atol=1e-4, rtol=1e-4)
    top_values, top_ids = torch.topk(logprobs[-1], 5)
    assert [token_id for token_id, _ in first.token.top] == top_ids.tolist()
    assert first.token.token_id == top_ids[0] and first.token.logprob == pytest.approx(
        top_values[0].item(), abs=1e-4
    )


def test_prompt_logprobs_survive_a_preemption_in_the_middle_of_prefill(tiny_model_dir):
    """A 40-token prompt prefilled 16 tokens a step beside a growing decode in an 11-block cache is
    preempted mid-prefill and recomputed: it still gets one log-prob per prompt token, the same ones."""
    block_size = 4
    bytes_per_block = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(torch.float32, 1) * block_size

    def run(num_blocks: int) -> tuple[Engine, list]:
        config = EngineConfig(
            block_size=block_size,
            kv_cache_bytes=num_blocks * bytes_per_block,
            max_batch_tokens=16,
            enable_prefix_caching=False,
        )
        engine = Engine(tiny_model_dir, config)
        decode = EngineRequest(
            "decode", list(range(100, 104)), SamplingParams(max_new_tokens=40, ignore_eos=True)
        )
        prompt = EngineRequest(
            "prompt",
            list(range(200, 240)),
            SamplingParams(max_new_tokens=4, ignore_eos=True),
            want_prompt_logprobs=True,
        )
        return engine, engine.generate([decode, prompt])["prompt"]

    contended, outputs = run(11)
    uncontended, expected = run(64)
    assert contended.stats.num_preemptions > 0 and uncontended.stats.num_preemptions == 0
    assert len(outputs[0].prompt_logprobs) == 40 and outputs[0].prompt_logprobs[0] is None
    torch.testing.assert_close(
        torch.tensor(outputs[0].prompt_logprobs[1:]), torch.tensor(expected[0].prompt_logprobs[1:])
    )
    assert tokens(outputs) == tokens(expected)


def test_max_new_tokens_is_respected_with_finish_reason_length(engine):
    outputs = engine.generate(greedy_requests([engine.prompts.encode_text("Count: 1, 2, 3,", False)], 5))[
        "r0"
    ]
    assert len(outputs) == 5 and outputs[-1].finish_reason == "length"
    assert all(output.finish_reason is None for output in outputs[:-1])


def test_stop_string_ends_generation_and_is_not_returned(engine):
    prompt = engine.prompts.encode_text(QUESTIONS[0], True)
    outputs = engine.generate(greedy_requests([prompt], 24, stop=(" Paris",)))["r0"]
    assert outputs[-1].finish_reason == "stop"
    assert "".join(output.text for output in outputs) == "The capital of France is"


def test_stop_token_id_ends_generation(engine):
    prompt = engine.prompts.encode_text(QUESTIONS[0], True)
    greedy = tokens(engine.generate(greedy_requests([prompt], 24))["r0"])
    outputs = engine.generate(greedy_requests([prompt], 24, stop_token_ids=(greedy[3],)))["r0"]
    assert tokens(outputs) == greedy[:4] and outputs[-1].finish_reason == "stop"


def test_aborting_a_running_request_frees_its_blocks_at_once(smollm2_dir):
    engine = Engine(smollm2_dir, EngineConfig(kv_cache_bytes=64 << 20))
    engine.start()
    try:
        first_token = threading.Event()
        request = EngineRequest(
            "long",
            engine.prompts.encode_text("Once upon a time", False),
            SamplingParams(max_new_tokens=500, ignore_eos=True),
        )
        engine.submit(request, lambda output: first_token.set())
        assert first_token.wait(30)
        assert engine.stats.kv_blocks_used > 0 and engine.stats.running_requests == 1
        aborted_at = time.time()
        engine.abort("long")
        _wait_for(lambda: engine.stats.kv_blocks_used == 0 and engine.stats.running_requests == 0)
        assert engine.stats.kv_blocks_free == engine.blocks.num_blocks
        # The figures carry the time they became true (a heartbeat's report time), not a later one.
        idle_stats = engine.stats
        assert aborted_at <= idle_stats.taken_at <= time.time()
        time.sleep(0.1)
        assert engine.stats is idle_stats
    finally:
        engine.stop()


def test_an_expired_deadline_fails_the_request_and_frees_its_blocks(engine):
    request = EngineRequest(
        "late",
        engine.prompts.encode_text("Hello", False),
        SamplingParams(max_new_tokens=50),
        deadline=time.monotonic() - 1,
    )
    outputs = engine.generate([request])["late"]
    assert outputs == [RequestFailed("deadline", "the request's deadline passed")]
    assert engine.blocks.num_used_blocks == 0


def test_context_is_the_smaller_of_the_model_and_the_kv_cache_and_limits_are_explained(engine):
    capacity = engine.blocks.num_blocks * engine.blocks.block_size
    assert engine.max_context == min(8192, capacity) == capacity  # 256 MiB holds ~5.8k SmolLM2 tokens
    with pytest.raises(ValueError, match=f"context is {capacity} tokens; shorten the prompt"):
        engine.prompts.resolve_max_new_tokens(capacity, None)
    with pytest.raises(ValueError, match=rf"must be at most {capacity - 100} \(context {capacity} minus 100"):
        engine.prompts.resolve_max_new_tokens(100, 9000)
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1, got 0"):
        engine.prompts.resolve_max_new_tokens(100, 0)
    assert engine.prompts.resolve_max_new_tokens(capacity - 2, None) == 2


def test_detokenizer_streams_valid_utf8(engine):
    text = "Snow ☃ and 🎉 confetti, naïve café"
    detokenizer = IncrementalDetokenizer(engine.prompts.tokenizer)
    deltas = [detokenizer.push(token_id) for token_id in engine.prompts.tokenizer.encode(text)]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


def _wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_random_finishes_aborts_deadlines_and_preemptions_give_every_block_back(tiny_model_dir, tmp_path):
    """A fixed-seed mix in a 14-block cache: shared prefixes, three adapters for two slots, greedy and
    seeded sampling, requests joining, aborted and expiring at random steps, so that sequences are
    preempted mid-prefill and mid-decode. Every step the blocks' reference counts are exactly the
    block tables' and the free list is the unreferenced blocks; at the end every block is free, no
    slot is held, nothing is left queued; and every request that ran to its end produced the tokens
    it produces in a cache large enough never to preempt."""
    rng = random.Random(20240611)
    block_size = 4
    bytes_per_block = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(torch.float32, 1) * block_size

    def make(num_blocks: int) -> Engine:
        config = EngineConfig(
            block_size=block_size,
            kv_cache_bytes=num_blocks * bytes_per_block,
            max_batch_tokens=24,
            max_running_requests=6,
            max_gpu_adapters=2,
            adapter_cycle_s=0.0,
        )
        return Engine(tiny_model_dir, config)

    sources = [
        write_peft_adapter(tmp_path / f"a{i}", tiny_model_dir, rank=4, seed=i, scale=0.5) for i in range(3)
    ]
    shared = [rng.randrange(3, 49000) for _ in range(13)]
    specs = []
    for i in range(24):
        body = [rng.randrange(3, 49000) for _ in range(rng.randrange(1, 30))]
        prompt = shared[: rng.randrange(0, 14)] + body if rng.random() < 0.6 else body
        params = SamplingParams(
            max_new_tokens=rng.randrange(1, 16), ignore_eos=True, temperature=rng.choice([0.0, 0.8]), seed=i
        )
        specs.append((f"r{i}", prompt, params, rng.choice([None, 0, 1, 2])))
    joins = {name: rng.randrange(0, 24) for name, *_ in specs}
    ends = {name: rng.randrange(0, 48) for name, *_ in rng.sample(specs, 10)}  # aborts, then deadlines
    expiring = set(list(ends)[5:])

    def requests_for(engine: Engine) -> list[EngineRequest]:
        adapters = [engine.load_adapter(str(source), f"a{i}", 1) for i, source in enumerate(sources)]
        return [
            EngineRequest(name, prompt, params, None if index is None else adapters[index])
            for name, prompt, params, index in specs
        ]

    contended = make(num_blocks=14)
    outputs: dict[str, list] = {name: [] for name, *_ in specs}
    pending = requests_for(contended)
    step = 0
    while pending or contended.scheduler.has_work:
        for request in [r for r in pending if joins[r.request_id] <= step]:
            contended._add(request, outputs[request.request_id].append)
            pending.remove(request)
        for name in [name for name, at in ends.items() if at == step and name in contended._requests]:
            if name in expiring:
                contended._requests[name].seq.deadline = 0.0  # long past: the step expires it
            else:
                contended.abort(name)
                contended._drain_inbox(block=False)
        contended.step()
        _assert_block_references_match_the_tables(contended)
        step += 1
        assert step < 2000, "the engine stopped making progress"
    blocks = contended.blocks
    assert blocks.num_free_blocks == blocks.num_blocks and not any(blocks._refs)
    assert not any(contended.slots._refs)
    assert not contended._requests and not contended.scheduler.sequences()
    assert not contended.scheduler._slot_wait_since
    assert contended.stats.num_preemptions > 0 and contended.stats.num_prefix_hit_tokens > 0

    roomy = make(num_blocks=400)
    finished = [r for r in requests_for(roomy) if r.request_id not in ends]
    expected = roomy.generate(finished)
    assert roomy.stats.num_preemptions == 0
    for request in finished:
        name = request.request_id
        assert tokens(outputs[name]) == tokens(expected[name]), name
    expired = 0
    for name in ends:  # ended early: an abort says nothing more, an expiry says why
        failures = [output for output in outputs[name] if isinstance(output, RequestFailed)]
        assert [f.reason for f in failures] == (["deadline"] if name in expiring and failures else [])
        expired += bool(failures)
    assert expired > 0


def _assert_block_references_match_the_tables(engine: Engine) -> None:
    blocks = engine.blocks
    refs = [0] * blocks.num_blocks
    for seq in engine.scheduler.sequences():
        for block in seq.block_table:
            refs[block] += 1
    assert blocks._refs == refs
    assert set(blocks._free) == {block for block, count in enumerate(refs) if count == 0}
