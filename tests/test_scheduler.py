"""Scheduling and block allocation as pure logic: no model, no tensors."""

import subprocess
import sys
from types import SimpleNamespace

import pytest

from loraplex.shard.adapter_slots import AdapterSlots
from loraplex.shard.block_manager import BlockManager
from loraplex.shard.sampling import SamplingParams
from loraplex.shard.scheduler import Scheduler
from loraplex.shard.sequence import Sequence, SequenceStatus


def _seq(name: str, num_prompt: int, max_new: int = 8, tokens: list[int] | None = None) -> Sequence:
    """Sequences with different names get different prompts unless `tokens` says otherwise."""
    token_ids = tokens if tokens is not None else [1000 * (ord(name[0]) % 32) + i for i in range(num_prompt)]
    return Sequence(name, token_ids, len(token_ids), SamplingParams(max_new_tokens=max_new))


def _run_step(scheduler: Scheduler) -> dict[str, int]:
    """Schedule one step, pretend the model ran, and append a token to every sequence that sampled."""
    schedule = scheduler.schedule()
    scheduler.advance(schedule.chunks)
    for chunk in schedule.chunks:
        if chunk.samples:
            chunk.seq.token_ids.append(0)
    return {chunk.seq.request_id: chunk.num_new_tokens for chunk in schedule.chunks}


def test_blocks_are_reserved_per_block_size_and_freed():
    blocks = BlockManager(num_blocks=4, block_size=4)
    seq = _seq("a", 5)
    assert blocks.blocks_needed(seq, 5) == 2
    blocks.reserve(seq, 5)
    assert len(seq.block_table) == 2 and blocks.num_free_blocks == 2
    seq.num_computed_tokens = 5
    assert blocks.blocks_needed(seq, 3) == 0  # positions 5..7 still fit the second block
    assert blocks.blocks_needed(seq, 4) == 1
    blocks.free(seq)
    assert blocks.num_free_blocks == 4 and seq.block_table == []


def test_reserving_more_than_is_free_is_refused():
    blocks = BlockManager(num_blocks=1, block_size=4)
    seq = _seq("a", 8)
    assert not blocks.can_reserve(seq, 8)
    with pytest.raises(RuntimeError):
        blocks.reserve(seq, 8)


def test_new_requests_join_running_ones_at_the_next_step():
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=100, max_running_requests=8)
    scheduler.add(_seq("a", 10))
    assert _run_step(scheduler) == {"a": 10}
    scheduler.add(_seq("b", 6))
    assert _run_step(scheduler) == {"a": 1, "b": 6}  # a decodes while b prefills, in one step


def test_long_prompts_are_prefilled_in_chunks_under_the_token_budget():
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=16, max_running_requests=8)
    scheduler.add(_seq("long", 40))
    scheduler.add(_seq("short", 3))
    assert _run_step(scheduler) == {"long": 16}
    assert _run_step(scheduler) == {"long": 16}
    assert _run_step(scheduler) == {"long": 8, "short": 3}
    assert _run_step(scheduler) == {"long": 1, "short": 1}


def test_waiting_requests_are_admitted_first_come_first_served():
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=12, max_running_requests=8)
    for name, size in (("a", 8), ("b", 8), ("c", 2)):
        scheduler.add(_seq(name, size))
    assert _run_step(scheduler) == {"a": 8, "b": 4}  # c must not overtake b
    assert _run_step(scheduler) == {"a": 1, "b": 4, "c": 2}


def test_running_requests_are_capped():
    scheduler = Scheduler(BlockManager(64, 4), max_batch_tokens=100, max_running_requests=2)
    for name in "abc":
        scheduler.add(_seq(name, 2))
    assert set(_run_step(scheduler)) == {"a", "b"}
    assert [seq.request_id for seq in scheduler.waiting] == ["c"]


def test_the_latest_request_is_preempted_when_blocks_run_out_and_recomputed_later():
    scheduler = Scheduler(BlockManager(4, 4), max_batch_tokens=100, max_running_requests=8)
    first, second = _seq("first", 8), _seq("second", 8)
    scheduler.add(first)
    scheduler.add(second)
    assert _run_step(scheduler) == {"first": 8, "second": 8}  # all 4 blocks in use
    assert _run_step(scheduler) == {"first": 1}  # first needs a block: second gives its two back
    assert second.status is SequenceStatus.WAITING and second.num_computed_tokens == 0
    assert second.num_preemptions == 1 and second.block_table == []
    assert second.num_tokens == 9  # its generated token is kept and recomputed with the prompt
    scheduler.finish(first)
    # Its first block survived in the prefix cache (its tail went back to the free list first and
    # was the one handed to `first`), so only the rest is recomputed.
    assert _run_step(scheduler) == {"second": 5}


def test_finishing_a_sequence_frees_its_blocks_at_once():
    blocks = BlockManager(8, 4)
    scheduler = Scheduler(blocks, max_batch_tokens=100, max_running_requests=8)
    seq = _seq("a", 10)
    scheduler.add(seq)
    _run_step(scheduler)
    assert blocks.num_used_blocks == 3
    scheduler.finish(seq)
    assert blocks.num_used_blocks == 0 and not scheduler.has_work


def test_a_shared_prompt_prefix_reuses_computed_blocks():
    blocks = BlockManager(16, 4)
    scheduler = Scheduler(blocks, max_batch_tokens=100, max_running_requests=8)
    system = list(range(9))  # two full blocks and one more token
    scheduler.add(_seq("first", 0, tokens=[*system, 50, 51]))
    assert _run_step(scheduler) == {"first": 11}
    second = _seq("second", 0, tokens=[*system, 60])
    scheduler.add(second)
    assert _run_step(scheduler)["second"] == 2  # 8 tokens came from the cache
    assert second.block_table[:2] == scheduler.running[0].block_table[:2]
    assert blocks.num_prefix_hit_tokens == 8


def test_the_last_prompt_token_is_always_computed():
    scheduler = Scheduler(BlockManager(16, 4), max_batch_tokens=100, max_running_requests=8)
    scheduler.add(_seq("first", 0, tokens=list(range(8))))
    _run_step(scheduler)
    scheduler.add(_seq("again", 0, tokens=list(range(8))))
    assert _run_step(scheduler)["again"] == 4  # the block holding the last token is recomputed


def test_prefix_blocks_differ_per_adapter_salt():
    scheduler = Scheduler(BlockManager(16, 4), max_batch_tokens=100, max_running_requests=8)
    scheduler.add(_seq("base", 0, tokens=list(range(9))))
    _run_step(scheduler)
    adapted = _seq("adapted", 0, tokens=list(range(9)))
    adapted.cache_salt = 7
    scheduler.add(adapted)
    assert _run_step(scheduler)["adapted"] == 9


def test_block_hashes_are_keyed_per_process_so_no_client_can_aim_a_prompt_at_them():
    """With an unkeyed hash, the same in every process, a prompt can be crafted offline to collide with
    another tenant's blocks; a per-process key makes a block's hash unknowable outside the shard."""
    code = "from loraplex.shard.block_manager import _chain; print(_chain(0, list(range(16)), 0, 16))"
    hashes = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    ]
    assert hashes[0] != hashes[1]


def test_freed_blocks_stay_cached_until_handed_out_again():
    blocks = BlockManager(4, 4)
    scheduler = Scheduler(blocks, max_batch_tokens=100, max_running_requests=8)
    first = _seq("first", 0, tokens=list(range(9)))
    scheduler.add(first)
    _run_step(scheduler)
    scheduler.finish(first)
    assert blocks.num_free_blocks == 4
    scheduler.add(_seq("again", 0, tokens=list(range(9))))
    assert _run_step(scheduler) == {"again": 1}
    filler = _seq("filler", 0, tokens=[500 + i for i in range(16)])
    scheduler.finish(scheduler.running[0])
    scheduler.add(filler)
    _run_step(scheduler)  # takes every block: the cached ones are overwritten
    scheduler.finish(filler)
    scheduler.add(_seq("late", 0, tokens=list(range(9))))
    assert _run_step(scheduler) == {"late": 9}


def test_prompt_logprob_requests_compute_every_position():
    scheduler = Scheduler(BlockManager(16, 4), max_batch_tokens=100, max_running_requests=8)
    scheduler.add(_seq("first", 0, tokens=list(range(9))))
    _run_step(scheduler)
    wanting = _seq("wanting", 0, tokens=list(range(9)))
    wanting.want_prompt_logprobs = True
    scheduler.add(wanting)
    assert _run_step(scheduler)["wanting"] == 9


def test_a_slot_write_that_raises_leaves_the_sequence_waiting_and_finishable():
    failures = [RuntimeError("simulated: the slot write failed")]

    def write_slot(slot, adapter):
        if failures:
            raise failures.pop()

    scheduler = Scheduler(BlockManager(16, 4), 64, 8, AdapterSlots(1, write_slot))
    stray = _seq("stray", 3)  # in neither queue, as a step that failed half way can leave one
    adapted = _add_adapter_request(scheduler, "adapted", SimpleNamespace(uid=1))
    behind = _seq("behind", 3)
    scheduler.add(behind)
    with pytest.raises(RuntimeError, match="slot write failed"):
        scheduler.schedule()
    assert list(scheduler.waiting) == [adapted, behind]
    scheduler.finish(stray)
    scheduler.finish(adapted)
    assert _run_step(scheduler) == {"behind": 3}
    assert scheduler.blocks.num_free_blocks == 15 and adapted.status is SequenceStatus.FINISHED


def _add_adapter_request(scheduler: Scheduler, name: str, adapter: SimpleNamespace) -> Sequence:
    """A long-running request for adapter (anything with a uid stands in for a LoraAdapter here)."""
    seq = Sequence(name, [7, 8, 9], 3, SamplingParams(max_new_tokens=100), adapter=adapter)  # type: ignore[arg-type]
    scheduler.add(seq)
    return seq


@pytest.mark.parametrize("adapter_cycle_s", [0.0, 1e9])
def test_the_adapter_cycle_keeps_a_hot_adapter_from_starving_a_cold_one(adapter_cycle_s: float):
    """One slot, a steady stream for hot adapter A, one request for cold adapter B. Requests joining A's
    busy slot would keep it busy forever; once B has found every slot busy for adapter_cycle_s, they are
    held back, A's slot drains and B gets it. With the cycle off (1e9 s) B starves."""
    hot, cold = SimpleNamespace(uid=1), SimpleNamespace(uid=2)
    scheduler = Scheduler(BlockManager(num_blocks=64, block_size=4), 64, 8, AdapterSlots(1), adapter_cycle_s)

    def request(name: str, adapter: SimpleNamespace) -> Sequence:
        return _add_adapter_request(scheduler, name, adapter)

    request("a0", hot)
    _run_step(scheduler)
    b = request("b", cold)
    admitted_at = None
    for step in range(1, 10):
        request(f"a{step}", hot)
        if step >= 2:  # the oldest request for A finishes every step
            scheduler.finish(min(scheduler.running, key=lambda seq: int(seq.request_id[1:])))
        _run_step(scheduler)
        if b.status is SequenceStatus.RUNNING:
            admitted_at = step
            break
        assert scheduler.waiting[0] is b, "b keeps its place at the head of the queue"
    if adapter_cycle_s == 0.0:
        assert admitted_at is not None and admitted_at <= 4, "A's slot drained and went to b"
        assert all(seq.adapter is hot for seq in scheduler.waiting), "later requests for A wait their turn"
    else:
        assert admitted_at is None, "without the cycle, a steady stream for A starves b"


def test_the_adapter_cycle_drains_only_the_least_used_slot():
    """Two slots busy with A (one request) and C (three); B is starved: only A's slot stops taking new
    requests, C's keeps batching, and B gets A's slot once A's request ends."""
    a, b, c = (SimpleNamespace(uid=uid) for uid in (1, 2, 3))
    scheduler = Scheduler(
        BlockManager(num_blocks=64, block_size=4), 64, 8, AdapterSlots(2), adapter_cycle_s=0.0
    )

    def request(name: str, adapter: SimpleNamespace) -> Sequence:
        return _add_adapter_request(scheduler, name, adapter)

    first_a = request("a0", a)
    for index in range(3):
        request(f"c{index}", c)
    _run_step(scheduler)
    starved = request("b0", b)
    _run_step(scheduler)  # b0 finds both slots busy: its clock starts
    late_a, late_c = request("a1", a), request("c3", c)
    _run_step(scheduler)
    assert late_c.status is SequenceStatus.RUNNING, "C's slot is not the one draining"
    assert late_a.status is SequenceStatus.WAITING, "A's slot, the least used, takes no one new"
    scheduler.finish(first_a)
    _run_step(scheduler)
    assert starved.status is SequenceStatus.RUNNING, "A's slot drained and went to b0"


def test_a_request_waiting_for_a_slot_does_not_hold_up_the_base_model_for_blocks():
    """B's request waits for A's slot and its prompt needs more blocks than are free: a base request
    behind it fits and goes ahead (B could not run anyway); before, B's block check came first and
    stopped admission for as long as A's request ran."""
    a, b = SimpleNamespace(uid=1), SimpleNamespace(uid=2)
    scheduler = Scheduler(BlockManager(8, 4), 64, 8, AdapterSlots(1), adapter_cycle_s=1e9)
    _add_adapter_request(scheduler, "a0", a)
    _run_step(scheduler)
    cold = Sequence("cold", list(range(100, 130)), 30, SamplingParams(max_new_tokens=5), adapter=b)  # type: ignore[arg-type]
    scheduler.add(cold)
    scheduler.add(_seq("base", 3))
    assert _run_step(scheduler) == {"a0": 1, "base": 3}
    assert list(scheduler.waiting) == [cold]


def test_an_adapter_given_a_slot_is_not_drained_for_its_own_waiting_requests():
    """b1 and b2 find both slots busy; b1 gets the slot C's request left, b2 must wait for room in the
    batch. Its starvation clock must not then make B's own slot drain: b2 joins B's slot at the next
    free place, ahead of a3 that came after it (before, b2 waited for b1's 100 tokens to end)."""
    a, b, c = (SimpleNamespace(uid=uid) for uid in (1, 2, 3))
    scheduler = Scheduler(BlockManager(256, 4), 64, 5, AdapterSlots(2), adapter_cycle_s=0.0)
    first_a = [_add_adapter_request(scheduler, f"a{index}", a) for index in range(3)]
    only_c = _add_adapter_request(scheduler, "c0", c)
    _run_step(scheduler)
    b1, b2 = _add_adapter_request(scheduler, "b1", b), _add_adapter_request(scheduler, "b2", b)
    scheduler.add(_seq("x", 3, max_new=100))
    _run_step(scheduler)  # b1 and b2 find every slot busy; x takes the last place in the batch
    scheduler.finish(only_c)
    _run_step(scheduler)  # C's slot drained: b1 takes it, and the batch is full again
    assert b1.status is SequenceStatus.RUNNING and b2.status is SequenceStatus.WAITING
    scheduler.finish(first_a[0])
    late_a = _add_adapter_request(scheduler, "a3", a)
    _run_step(scheduler)
    assert b2.status is SequenceStatus.RUNNING and b2.lora_slot == b1.lora_slot
    assert late_a.status is SequenceStatus.WAITING
