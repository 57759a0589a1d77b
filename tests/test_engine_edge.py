"""Engine edge cases: requests that must fail alone, stats that are current when a caller hears that
its request ended, and configurations that could never serve."""

import queue
import time

import pytest

from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.outputs import RequestFailed
from loraplex.shard.sampling import SamplingParams

from engine_helpers import collect_outputs, tokens


def test_a_prompt_token_outside_the_vocabulary_is_refused_and_the_batch_is_served(tiny_model_dir):
    """The id reached the embedding lookup, whose failure failed every request in the step."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    vocab_size = engine.model_config.vocab_size
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    long = SamplingParams(max_new_tokens=200, ignore_eos=True)  # still running beside the bad ones
    running: queue.SimpleQueue = queue.SimpleQueue()
    engine.start()
    try:
        engine.submit(EngineRequest("running", [5, 6, 7], long), running.put)
        first = running.get(timeout=10)
        bad = collect_outputs(engine, EngineRequest("bad", [5, vocab_size], params), timeout=10)
        negative = collect_outputs(engine, EngineRequest("negative", [-1, 5], params), timeout=10)
        rest = [first]
        while not rest[-1].finish_reason:
            rest.append(running.get(timeout=10))
    finally:
        engine.stop()
    assert [output.reason for output in bad + negative] == ["error", "error"]
    assert "outside the vocabulary" in bad[0].message and str(vocab_size) in bad[0].message
    assert len(tokens(rest)) == 200 and rest[-1].finish_reason == "length"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_an_expired_request_is_gone_from_the_stats_when_its_caller_hears_of_it(tiny_model_dir):
    """The deadline failure was delivered before the step published its stats, so a caller reading
    them then (the service's load report) still found the request running and holding blocks."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    seen: queue.SimpleQueue = queue.SimpleQueue()

    def record(output) -> None:
        if isinstance(output, RequestFailed):
            seen.put((output, engine.stats))

    engine.start()
    try:
        request = EngineRequest(
            "late",
            [5, 6, 7],
            SamplingParams(max_new_tokens=10_000, ignore_eos=True),
            deadline=time.monotonic() + 0.2,
        )
        engine.submit(request, record)
        failure, stats = seen.get(timeout=10)
    finally:
        engine.stop()
    assert failure.reason == "deadline"
    assert (stats.running_requests, stats.waiting_requests, stats.queued_tokens) == (0, 0, 0)
    assert stats.kv_blocks_used == 0 and stats.kv_blocks_free == engine.blocks.num_blocks


@pytest.mark.parametrize(
    "field", ["block_size", "kv_cache_bytes", "max_batch_tokens", "max_running_requests"]
)
def test_an_engine_config_out_of_bounds_is_refused_with_the_field_named(field):
    """A negative max_batch_tokens left every request waiting forever (the engine spinning on it); a
    negative max_running_requests blamed the KV cache budget."""
    with pytest.raises(ValueError, match=f"{field} must be at least"):
        EngineConfig(**{field: -1})


def test_a_burst_of_submits_is_taken_in_with_one_publication_of_the_stats(tiny_model_dir):
    """The stats were published after each submit, each publication counting every sequence held, so a
    burst of n submits cost n^2 (4,000 queued submits took ~2 s of the engine thread, 0.05 s once
    published per drain). Counted, not timed: one publication per drain of the inbox."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    params = SamplingParams(max_new_tokens=4)
    for i in range(500):
        engine.submit(EngineRequest(f"r{i}", [5, 6, 7], params), lambda output: None)
    publications = []
    publish = engine._publish_stats
    engine._publish_stats = lambda: (publications.append(1), publish())  # type: ignore[method-assign]
    engine._drain_inbox(block=False)
    assert len(publications) == 1
    assert engine.stats.waiting_requests == 500 and engine.stats.queued_tokens == 500 * 7
