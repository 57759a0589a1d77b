"""The engine thread under failure: a broken step fails only the requests in flight."""

from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.outputs import RequestFailed, TokenOutput
from loraplex.shard.sampling import SamplingParams

from engine_helpers import collect_outputs


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
        failed = collect_outputs(engine, EngineRequest("a", [5, 6, 7], params))
        assert failed == [
            RequestFailed("error", "the shard hit an internal error while running this request")
        ]
        served = collect_outputs(engine, EngineRequest("b", [5, 6, 7], params))
        assert all(isinstance(output, TokenOutput) for output in served)
        assert served[-1].finish_reason == "length" and len(served) == 4
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.stop()
