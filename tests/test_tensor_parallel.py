"""Tensor-parallel shards on CPU (gloo): TP=2 and TP=3 give TP=1's greedy tokens and logits for a batch
mixing the base model and adapters of different ranks and targets, with KV heads split and with KV
heads replicated (fewer of them than ranks), through both LoRA backends; weights per rank are 1/N of
TP=1; and losing any rank takes the shard down cleanly (real processes, router failover)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
import redis
import torch

from loraplex.protos.v1 import common_pb2, generation_pb2_grpc
from loraplex.shard.engine import Engine, EngineConfig, EngineRequest
from loraplex.shard.outputs import TokenOutput
from loraplex.shard.sampling import SamplingParams
from loraplex.tools.demo_adapters import demo_adapter_dirs, is_upper_answer
from loraplex.tools.local_mesh import start_mesh
from loraplex.tools.tiny_model import write_tiny_model

from engine_helpers import collect_outputs, engine_last_logits, tokens
from peft_fixtures import write_peft_adapter

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ADAPTERS = [  # (rank, targets): every projection, column- and row-parallel, and ranks {4, 8, 16, 64}
    (4, ("q_proj", "v_proj")),
    (8, ATTENTION),
    (16, MLP),
    (64, ATTENTION + MLP),
    (8, ("k_proj", "o_proj", "down_proj")),
]
# fp32 on CPU: splitting a sum across ranks only reorders the additions
LOGIT_ATOL = 1e-4
# 6 heads split over 2 or 3 ranks; the vocabulary (49157) divides by neither, so the last rank's
# share of the embedding and LM head is padded
HEADS, HIDDEN, VOCAB = 6, 96, 49157
CASES = [  # (tp, KV heads, LoRA backend)
    (2, 2, "torch"),  # KV heads split
    (3, 3, "torch"),
    (3, 1, "triton"),  # one KV head replicated on 3 ranks; the kernels on sliced slot buffers
]
SLOTS = 3  # fewer slots than adapters: slots are rewritten mid-run, on every rank alike


def _prompts() -> list[list[int]]:
    return [[5 + i, 300 + 7 * i, 1000 + i, 42, *range(60, 60 + i)] for i in range(len(ADAPTERS) + 1)]


def _run(engine: Engine, sources: list[Path]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens for the mixed batch (row 0 is the base model) and each row's last-step logits."""
    adapters = [engine.load_adapter(str(source), f"a{i}", 1) for i, source in enumerate(sources)]
    rows = [None, *adapters]
    requests = [
        EngineRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True), adapter=adapter)
        for i, (prompt, adapter) in enumerate(zip(_prompts(), rows, strict=True))
    ]
    outputs = engine.generate(requests)
    logits = []
    for start in range(0, len(rows), SLOTS):  # as many adapters at once as there are slots
        group = slice(start, start + SLOTS)
        logits += engine_last_logits(engine, _prompts()[group], [77] * len(rows[group]), rows[group])
    return [tokens(outputs[f"r{i}"]) for i in range(len(rows))], logits


@pytest.fixture(scope="module")
def reference(tmp_path_factory, smollm2_dir):
    """Per KV-head count: the model, its adapters, and TP=1's tokens, logits and memory."""
    cache: dict[int, tuple] = {}

    def get(kv_heads: int) -> tuple:
        if kv_heads not in cache:
            model_dir = write_tiny_model(
                tmp_path_factory.mktemp(f"tp-kv{kv_heads}"),
                smollm2_dir,
                hidden_size=HIDDEN,
                num_heads=HEADS,
                num_kv_heads=kv_heads,
                vocab_size=VOCAB,
            )
            sources = [
                write_peft_adapter(
                    tmp_path_factory.mktemp(f"tp-kv{kv_heads}-a{i}"),
                    model_dir,
                    rank=rank,
                    alpha=2 * rank,
                    targets=targets,
                    seed=i,
                    scale=0.3,
                )
                for i, (rank, targets) in enumerate(ADAPTERS)
            ]
            engine = Engine(model_dir, _config(1, "torch"))
            kv_bytes_per_block = engine.kv_cache.nbytes // engine.blocks.num_blocks
            memory = (engine.rank_memory[0].weight_bytes, kv_bytes_per_block)
            cache[kv_heads] = (model_dir, sources, *_run(engine, sources), memory)
        return cache[kv_heads]

    return get


def _config(tp: int, backend: str) -> EngineConfig:
    return EngineConfig(kv_cache_bytes=8 << 20, max_gpu_adapters=SLOTS, lora_backend=backend, tp_size=tp)


@pytest.mark.parametrize(("tp", "kv_heads", "backend"), CASES)
def test_tp_matches_tp1_for_a_mixed_batch_with_weights_split_n_ways(reference, tp, kv_heads, backend):
    model_dir, sources, expected_tokens, expected_logits, (tp1_weights, tp1_kv_per_block) = reference(
        kv_heads
    )
    engine = Engine(model_dir, _config(tp, backend))
    try:
        got_tokens, got_logits = _run(engine, sources)
        memory = engine.rank_memory
    finally:
        engine.stop()
    assert got_tokens == expected_tokens
    for row, (got, expected) in enumerate(zip(got_logits, expected_logits, strict=True)):
        torch.testing.assert_close(got, expected, atol=LOGIT_ATOL, rtol=0, msg=f"row {row}")
    assert engine.slots.counters.evictions > 0, "slots were rewritten during the run"
    assert [m.rank for m in memory] == list(range(tp))
    # everything is split but the norms and the one padded vocabulary row: 1/N within 1%
    for rank in memory:
        assert rank.weight_bytes <= tp1_weights / tp * 1.01, rank
    # every rank's cache has the first rank's blocks, each holding the rank's KV heads only (a
    # replicated KV head is one per rank)
    kv_heads_per_rank = max(1, kv_heads // tp)
    for rank in memory:
        assert (
            rank.kv_cache_bytes == engine.blocks.num_blocks * tp1_kv_per_block // kv_heads * kv_heads_per_rank
        )


def test_smollm2_at_tp3_answers_as_at_tp1_with_the_demo_adapters(smollm2_dir):
    """The real model (9 heads, 3 KV heads: one KV head per rank) with the committed demo adapters."""
    answers = {}
    for tp in (1, 3):
        engine = Engine(smollm2_dir, EngineConfig(kv_cache_bytes=64 << 20, tp_size=tp))
        try:
            adapters = [None] + [
                engine.load_adapter(str(path), name, 1) for name, path in demo_adapter_dirs().items()
            ]
            prompt = engine.prompts.encode_text("Name three colours.", apply_chat_template=True)
            requests = [
                EngineRequest(f"r{i}", prompt, SamplingParams(max_new_tokens=12), adapter=adapter)
                for i, adapter in enumerate(adapters)
            ]
            outputs = engine.generate(requests)
            answers[tp] = [tokens(outputs[request.request_id]) for request in requests]
            text = engine.prompts.tokenizer.decode(answers[tp][2], skip_special_tokens=True)
        finally:
            engine.stop()
    assert len(answers[1]) == 3 and len(set(map(tuple, answers[1]))) == 3, "each adapter changes the answer"
    assert answers[3] == answers[1]
    assert is_upper_answer(text), text


def test_a_size_the_model_cannot_be_split_into_is_refused_before_any_rank_starts(tiny_model_dir):
    # the tiny model has 4 heads, 2 KV heads and an MLP 128 wide
    with pytest.raises(ValueError, match=r"heads \(4\), MLP width \(128\), KV heads \(2; .*\) must divide"):
        Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, tp_size=3))
    with pytest.raises(ValueError, match="at least 1"):
        Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, tp_size=0))


def test_an_adapter_dropped_while_a_request_holds_it_is_sent_to_the_ranks_again(reference):
    """A delete forgets the adapter on every rank; a request that still holds it gets it back into a
    slot on every rank (the first rank sends it again) and is served by the same weights."""
    model_dir, sources, expected_tokens, _, _ = reference(2)
    engine = Engine(model_dir, _config(2, "torch"))
    engine.start()
    try:
        adapter = engine.load_adapter(str(sources[3]), "a3", 1)
        first = collect_outputs(engine, EngineRequest("x", _prompts()[4], _greedy(), adapter=adapter))
        engine.drop_adapter(adapter.uid)  # deleted: gone from every rank's CPU tier and slot
        again = collect_outputs(engine, EngineRequest("y", _prompts()[4], _greedy(), adapter=adapter))
    finally:
        engine.stop()
    assert tokens(first) == tokens(again) == expected_tokens[4]
    assert engine.slots.counters.misses == 2


def _greedy() -> SamplingParams:
    return SamplingParams(max_new_tokens=8, ignore_eos=True)


def test_a_rank_that_dies_fails_the_engine_with_unavailable_and_refuses_new_work(tiny_model_dir):
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, tp_size=2))
    failures: list[str] = []
    engine.on_failure(failures.append)
    engine.start()
    try:
        assert isinstance(collect_outputs(engine, EngineRequest("a", [5, 6, 7], _greedy()))[-1], TokenOutput)
        rank1 = engine.peers._processes[0]
        os.kill(rank1.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = collect_outputs(engine, EngineRequest("b", [5, 6, 7], _greedy()))
    finally:
        engine.stop()
    assert failures and f"pid {rank1.pid}" in failures[0] and "code -9" in failures[0]
    assert len(refused) == 1 and refused[0].reason == "unavailable"
    assert "retry on another shard" in refused[0].message


def test_a_stuck_rank_takes_the_shard_down_after_the_timeout_instead_of_hanging_it(tiny_model_dir):
    engine = Engine(tiny_model_dir, EngineConfig(kv_cache_bytes=8 << 20, tp_size=2, tp_timeout_s=3))
    failures: list[str] = []
    engine.on_failure(failures.append)
    engine.start()
    rank1 = engine.peers._processes[0]
    try:
        os.kill(rank1.pid, signal.SIGSTOP)  # alive, but never joins another collective
        started = time.monotonic()
        failed = collect_outputs(engine, EngineRequest("a", [5, 6, 7], _greedy()))
        failed_after = time.monotonic() - started
    finally:
        stopping = time.monotonic()
        engine.stop()
        stopped_in = time.monotonic() - stopping
    assert len(failed) == 1 and failed[0].reason == "unavailable", failed
    assert 2.5 < failed_after < 10, failed_after
    assert failures and "Timed out" in failures[0], failures
    assert stopped_in < 3, "the stuck rank is killed, not waited for"
    rank1.join(5)
    assert rank1.exitcode == -signal.SIGKILL


# --- real processes ------------------------------------------------------------------------------

REQUEST = common_pb2.GenerateRequest(
    prompt="Once upon a time",
    parameters=common_pb2.SamplingParameters(max_new_tokens=24, ignore_eos=True),
)


def _tp_children(pid: int) -> list[int]:
    """The tensor-parallel rank processes (multiprocessing spawn children) of a shard process."""
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(child) for child in (task / "children").read_text().split()]
    return [
        child
        for child in children
        if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes()
        and b"resource_tracker" not in Path(f"/proc/{child}/cmdline").read_bytes()
    ]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.fixture
def tp_mesh(tiny_model_dir, redis_url, namespace, tmp_path):
    mesh = start_mesh(
        tiny_model_dir,
        redis_url,
        namespace,
        tmp_path,
        num_shards=2,
        shard_args=("--tp", "2"),
        router_args=("--refresh-interval", "0.25"),
    )
    yield mesh
    mesh.stop()


def test_killing_a_rank_takes_the_shard_down_and_the_router_fails_over(
    tp_mesh, redis_url, namespace, tmp_path
):
    shard = tp_mesh.processes["shard-0"]
    (rank1,) = _tp_children(shard.pid)
    results: list[str] = []  # serving shard of each completed request
    errors: list[grpc.StatusCode] = []
    stop_sending = threading.Event()

    def client() -> None:
        with grpc.insecure_channel(tp_mesh.router) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            while not stop_sending.is_set():
                try:
                    results.append(stub.Generate(REQUEST, timeout=60).served_by.shard)
                except grpc.RpcError as error:
                    errors.append(error.code())

    clients = [threading.Thread(target=client) for _ in range(4)]
    for thread in clients:
        thread.start()
    deadline = time.monotonic() + 30
    while set(results) != {"shard-0", "shard-1"} and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(results) == {"shard-0", "shard-1"}, "both shards serve before the kill"
    os.kill(rank1, signal.SIGKILL)
    killed_at, served_before = time.monotonic(), len(results)
    assert shard.wait(timeout=20) == 1, "the shard exits, and says it failed"
    down_after = time.monotonic() - killed_at
    time.sleep(2.0)
    stop_sending.set()
    for thread in clients:
        thread.join(timeout=60)

    log = (tmp_path / "shard-0.log").read_text()
    assert f"tensor-parallel rank 1 (pid {rank1}) exited with code -9" in log
    assert down_after < 10, f"the shard took {down_after:.1f} s to go down"
    # a request that had streamed tokens cannot be replayed: UNAVAILABLE; the rest were retried
    assert set(errors) <= {grpc.StatusCode.UNAVAILABLE}, errors
    assert len(errors) <= 4, "at most the requests in flight on the dead shard"
    assert results[served_before + len(errors) :], "serving went on"
    assert set(results[-8:]) == {"shard-1"}, "after the kill the other shard serves everything"
    client_redis = redis.Redis.from_url(redis_url)
    assert not client_redis.exists(f"{namespace}:shard:shard-0"), "it left the membership"
    assert client_redis.exists(f"{namespace}:shard:shard-1")


def test_a_stopped_shard_stops_its_ranks_and_a_killed_one_leaves_none_behind(tp_mesh):
    drained, killed = tp_mesh.processes["shard-0"], tp_mesh.processes["shard-1"]
    (drained_rank,) = _tp_children(drained.pid)
    (orphan,) = _tp_children(killed.pid)
    drained.send_signal(signal.SIGTERM)
    assert drained.wait(timeout=30) == 0, "SIGTERM drains and stops every rank, then exits cleanly"
    assert not _alive(drained_rank)
    killed.send_signal(signal.SIGKILL)  # rank 0 gets no chance to stop the others
    killed.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _alive(orphan) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(orphan), "a rank never outlives its shard"
