"""The engine thread under failure: a broken step fails only the requests in flight; a stuck one, or a
dead engine thread, takes the engine (and its shard) down with UNAVAILABLE."""

import asyncio
import queue
import threading
import time

import grpc
import pytest
import torch

from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.registry.store import Registry
from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.model_config import ModelConfig
from loraplex.shard.model_runner import ModelRunner
from loraplex.shard.outputs import RequestFailed, TokenOutput
from loraplex.shard.sampling import SamplingParams, TokenSampler
from loraplex.shard.server import ShardConfig, ShardFailed, serve

from engine_helpers import collect_outputs, tokens
from peft_fixtures import write_peft_adapter


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
        # published before the failure was delivered: not left counting the failed request until the
        # next submit (an idle shard reporting load to the routers meanwhile)
        assert (engine.stats.running_requests, engine.stats.waiting_requests) == (0, 0)
        assert engine.stats.kv_blocks_used == 0 and engine.stats.queued_tokens == 0
        served = collect_outputs(engine, EngineRequest("b", [5, 6, 7], params))
        assert all(isinstance(output, TokenOutput) for output in served)
        assert served[-1].finish_reason == "length" and len(served) == 4
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.stop()


def test_a_tiny_temperature_decodes_greedily_beside_other_requests(tiny_model_dir):
    """1e-40 is a valid OpenAI temperature; dividing logits by it overflowed and failed the request (and,
    before sampling was isolated per request, the whole batch)."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    prompt = [5, 6, 7, 8]
    greedy = SamplingParams(max_new_tokens=6, ignore_eos=True)
    tiny = SamplingParams(max_new_tokens=6, ignore_eos=True, temperature=1e-40)
    outputs = engine.generate([EngineRequest("greedy", prompt, greedy), EngineRequest("tiny", prompt, tiny)])
    assert tokens(outputs["tiny"]) == tokens(outputs["greedy"])


def test_a_request_whose_sampling_fails_fails_alone(tiny_model_dir, monkeypatch):
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    choose = TokenSampler.choose

    def fails_for_seed_13(sampler, logits, context_ids):
        if sampler.params.seed == 13:
            raise RuntimeError("simulated: probability tensor contains nan")
        return choose(sampler, logits, context_ids)

    monkeypatch.setattr(TokenSampler, "choose", fails_for_seed_13)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True, temperature=1.0)
    outputs = engine.generate(
        [
            EngineRequest("ok", [5, 6, 7], params),
            EngineRequest("bad", [5, 6, 7], SamplingParams(max_new_tokens=4, temperature=1.0, seed=13)),
        ]
    )
    assert outputs["bad"] == [RequestFailed("error", "the shard could not choose this request's next token")]
    assert len(tokens(outputs["ok"])) == 4 and outputs["ok"][-1].finish_reason == "length"
    assert engine.stats.kv_blocks_used == 0 and not engine.scheduler.has_work


def test_a_slot_write_failing_at_admission_fails_its_requests_and_the_engine_keeps_serving(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The sequence was taken off the waiting queue before its slot write raised: failing it then broke
    the engine thread and every later request hung."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    source = write_peft_adapter(tmp_path / "a", tiny_model_dir, rank=4, targets=("q_proj",), seed=0)
    adapter = engine.load_adapter(str(source), "a", 1)
    write = engine.rank_adapters.write
    calls = []

    def fails_once(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("simulated: copying the adapter into its slot failed")
        return write(*args)

    monkeypatch.setattr(engine.rank_adapters, "write", fails_once)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        failed = collect_outputs(
            engine, EngineRequest("lora", [5, 6, 7], params, adapter=adapter), timeout=10
        )
        assert [output.reason for output in failed] == ["error"]  # type: ignore[union-attr]
        for request in (
            EngineRequest("base", [5, 6, 7], params),
            EngineRequest("again", [5, 6, 7], params, adapter=adapter),
        ):
            served = collect_outputs(engine, request, timeout=10)
            assert len(tokens(served)) == 3
        assert engine.stats.kv_blocks_used == 0
    finally:
        engine.stop()


def test_the_failure_listeners_are_told_even_if_failing_a_request_breaks(tiny_model_dir, monkeypatch):
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20))
    failures: list[str] = []
    engine.on_failure(failures.append)
    outputs: queue.SimpleQueue = queue.SimpleQueue()
    engine.start()
    try:
        engine.submit(
            EngineRequest("long", [5, 6, 7], SamplingParams(max_new_tokens=10_000, ignore_eos=True)),
            outputs.put,
        )
        assert isinstance(outputs.get(timeout=10), TokenOutput)

        def broken_finish(seq):
            raise RuntimeError("simulated: freeing the request's blocks failed")

        monkeypatch.setattr(engine.scheduler, "finish", broken_finish)
        engine._inbox.put(("fatal", "rank 1 exited"))  # how TensorParallelPeers.watch reports a lost rank
        last = outputs.get(timeout=10)
        while isinstance(last, TokenOutput):
            last = outputs.get(timeout=10)
        assert last.reason == "unavailable"
        engine._thread.join(timeout=10)
        assert failures == ["rank 1 exited"]
    finally:
        engine.stop()


def test_a_prompt_the_kv_cache_cannot_hold_is_refused_and_the_rest_are_served(tiny_model_dir):
    """A prompt longer than the whole KV cache waited for blocks forever (the engine thread spun on it,
    its caller never heard back); an empty one broke the step and failed every request beside it."""
    block_bytes = ModelConfig.from_dir(tiny_model_dir).kv_bytes_per_token(torch.float32, 1) * 4
    engine = Engine(tiny_model_dir, EngineConfig(block_size=4, kv_cache_bytes=8 * block_bytes))
    assert engine.max_context == 32
    params = SamplingParams(max_new_tokens=3, ignore_eos=True)
    requests = [
        EngineRequest("too long", list(range(100, 133)), params),
        EngineRequest("empty", [], params),
        EngineRequest("fits", list(range(100, 132)), params),  # the whole context: room for one token
        EngineRequest("short", [5, 6, 7], params),
    ]
    queues: dict[str, queue.SimpleQueue] = {request.request_id: queue.SimpleQueue() for request in requests}
    engine.start()
    try:
        for request in requests:
            engine.submit(request, queues[request.request_id].put)
        outputs = {name: _until_last(outputs) for name, outputs in queues.items()}
    finally:
        engine.stop()
    assert outputs["too long"] == [
        RequestFailed(
            "error", "the prompt has 33 tokens but this shard's context is 32 tokens; shorten the prompt"
        )
    ]
    assert outputs["empty"] == [RequestFailed("error", "the prompt is empty")]
    assert len(tokens(outputs["fits"])) == 1 and outputs["fits"][-1].finish_reason == "length"
    assert len(tokens(outputs["short"])) == 3
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_a_request_id_already_in_flight_is_refused_and_the_first_request_is_untouched(tiny_model_dir):
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=4 << 20))
    first, second = queue.SimpleQueue(), queue.SimpleQueue()
    params = SamplingParams(max_new_tokens=64, ignore_eos=True)
    engine.start()
    try:
        engine.submit(EngineRequest("same", [5, 6, 7], params), first.put)
        started = [first.get(timeout=10)]  # in flight now, with 63 tokens to go
        engine.submit(EngineRequest("same", [8, 9], params), second.put)
        outputs = started + _until_last(first), _until_last(second)
    finally:
        engine.stop()
    assert len(tokens(outputs[0])) == 64
    assert outputs[1] == [
        RequestFailed("error", "request id 'same' is already in use by a request in flight")
    ]
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def _until_last(outputs: queue.SimpleQueue, timeout: float = 10) -> list:
    collected = [outputs.get(timeout=timeout)]
    while isinstance(collected[-1], TokenOutput) and not collected[-1].finish_reason:
        collected.append(outputs.get(timeout=timeout))
    return collected


def test_a_stuck_step_fails_what_the_engine_holds_with_unavailable_and_tells_the_listeners(
    tiny_model_dir, monkeypatch
):
    """A step that never returns (a hung kernel, a deadlock) left its requests, and every later one,
    waiting for ever while the shard still looked healthy. The watchdog gives up on it after
    step_timeout_s."""
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, step_timeout_s=0.5))
    release = threading.Event()
    run = engine.runner.run
    monkeypatch.setattr(engine.runner, "run", lambda chunks: release.wait(30) and run(chunks))
    failures: list[str] = []
    engine.on_failure(failures.append)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        started = time.monotonic()
        stuck = collect_outputs(engine, EngineRequest("stuck", [5, 6, 7], params), timeout=10)
        assert time.monotonic() - started < 5
        assert [output.reason for output in stuck] == ["unavailable"]  # type: ignore[union-attr]
        assert "the engine is stuck: a step has run for more than 0.5 s" in stuck[0].message  # type: ignore[union-attr]
        assert failures and "engine is stuck" in failures[0]
        later = collect_outputs(engine, EngineRequest("later", [5, 6], params), timeout=10)
        assert [output.reason for output in later] == ["unavailable"]  # type: ignore[union-attr]
        stopping = time.monotonic()
        engine.stop()  # does not wait for the stuck thread for ever
        assert time.monotonic() - stopping < 5
    finally:
        release.set()
        engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread does die
def test_an_engine_thread_that_dies_fails_its_requests(tiny_model_dir, monkeypatch):
    """`_loop` keeps serving through an Exception; anything else ended the thread silently."""

    class Escaped(BaseException):
        pass

    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, step_timeout_s=0.5))

    def dies(chunks):
        raise Escaped("simulated: the engine thread was torn down")

    monkeypatch.setattr(engine.runner, "run", dies)
    failures: list[str] = []
    engine.on_failure(failures.append)
    engine.start()
    try:
        params = SamplingParams(max_new_tokens=4, ignore_eos=True)
        failed = collect_outputs(engine, EngineRequest("a", [5, 6, 7], params), timeout=10)
        assert [output.reason for output in failed] == ["unavailable"]  # type: ignore[union-attr]
        assert failures == ["the engine thread died"]
    finally:
        engine.stop()


def test_a_stuck_engine_takes_its_shard_down_and_out_of_the_membership(
    tiny_model_dir, redis_url, namespace, tmp_path, monkeypatch
):
    """A real shard server whose engine hangs in its first step: the call gets UNAVAILABLE (a router
    retries it elsewhere), the shard deregisters and serve() raises ShardFailed, so its process exits
    and is restarted, instead of heartbeating on with requests it never serves."""
    release = threading.Event()
    run = ModelRunner.run
    monkeypatch.setattr(ModelRunner, "run", lambda self, chunks: release.wait(60) and run(self, chunks))
    config = ShardConfig(
        shard_id="stuck",
        model=str(tiny_model_dir),
        cache_dir=tmp_path / "cache",
        redis_url=redis_url,
        port=0,
        namespace=namespace,
        engine=EngineConfig(kv_cache_bytes=16 << 20, step_timeout_s=1.0),
    )
    request = shard_pb2.ShardGenerateRequest(
        request=common_pb2.GenerateRequest(
            prompt_token_ids=[5, 6, 7], parameters=common_pb2.SamplingParameters(max_new_tokens=4)
        )
    )

    async def scenario() -> tuple[grpc.aio.AioRpcError, list]:
        registry = Registry(redis_url, namespace)
        shard = asyncio.create_task(serve(config, asyncio.Event()))
        try:
            while not (members := await registry.live_shards()):
                assert not shard.done(), shard
                await asyncio.sleep(0.1)
            async with grpc.aio.insecure_channel(members[0].address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await shard_pb2_grpc.ShardStub(channel).Generate(request, timeout=30).read()
            with pytest.raises(ShardFailed, match="the engine is stuck: a step has run for more than 1 s"):
                await asyncio.wait_for(shard, timeout=30)
            return raised.value, await registry.live_shards()
        finally:
            release.set()
            await registry.close()

    error, members = asyncio.run(scenario())
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert "engine is stuck" in error.details()
    assert members == []
