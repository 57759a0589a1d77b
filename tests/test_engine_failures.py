"""The engine thread under failure: a broken step fails only the requests in flight."""

import queue

from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.outputs import RequestFailed, TokenOutput
from loraplex.shard.sampling import SamplingParams


def _collect(engine: Engine, request: EngineRequest) -> list:
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    engine.submit(request, outputs.put)
    collected = []
    while True:
        output = outputs.get(timeout=30)
        collected.append(output)
        if isinstance(output, RequestFailed) or output.finish_reason:
            return collected


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(tiny_model_dir, monkeypatch):
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    run = engine.runner.run
    calls = []

    def fails_once(chunks):
        calls.append(len(chunks))
        if len(calls) == 1:
            raise RuntimeError("simulated kernel failure")
        return run(chunks)

    monkeypatch.setattr(engine.runner, "run", fails_once)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        failed = _collect(engine, EngineRequest("a", [5, 6, 7], params))
        assert failed == [
            RequestFailed("error", "the shard hit an internal error while running this request")
        ]
        served = _collect(engine, EngineRequest("b", [5, 6, 7], params))
        assert all(isinstance(output, TokenOutput) for output in served)
        assert served[-1].finish_reason == "length" and len(served) == 4
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.stop()
