"""The Triton shrink/expand kernels against the plain-torch reference (and both against the naive
per-row formula), run on CPU tensors through Triton's interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton: kernels run on CPU

import math
from collections.abc import Callable

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from loraplex.shard import lora_kernels
from loraplex.shard.lora import LoraAdapter
from loraplex.shard.lora_ops import (
    KERNEL_TOLERANCES,
    LoraStepMetadata,
    build_lora_metadata,
    expand_reference,
    shrink_reference,
)
from loraplex.shard.lora_torch import PackedLoraSlots

IN_FEATURES = 72  # two shrink K steps, the second masked
OUT_FEATURES = 136  # three expand output blocks, the last masked
TOLERANCES = {getattr(torch, name): tolerance for name, tolerance in KERNEL_TOLERANCES.items()}
DTYPES = list(TOLERANCES)
RANKS = {"r4": (4,), "r8": (8,), "r16": (16,), "r64": (64,), "mixed": (4, 8, 16, 64)}
BATCHES = {  # segment lengths in token order
    "decode": [1] * 9,
    "prefill": [7, 19, 12],
    "mixed": [1, 13, 1, 1, 9, 1, 3],
}
MIXES = ("distinct", "uniform", "zipf", "identical", "skewed")
NUM_SLOTS = 6
OPS = {
    "kernels": (lora_kernels.shrink, lora_kernels.expand),
    "reference": (shrink_reference, expand_reference),
}


def adapter_slots(mix: str, num_segments: int, num_slots: int, seed: int = 0) -> list[int]:
    """Each segment's slot under one popularity pattern (the punica test mixes)."""
    generator = torch.Generator().manual_seed(seed)
    if mix == "distinct":
        assert num_segments <= num_slots
        return torch.randperm(num_slots, generator=generator)[:num_segments].tolist()
    if mix == "identical":
        return [num_slots - 1] * num_segments
    weights = {
        "uniform": torch.ones(num_slots),
        "zipf": 1.0 / torch.arange(1, num_slots + 1, dtype=torch.float32) ** 1.5,
        "skewed": torch.tensor([20.0] + [1.0] * (num_slots - 1)),
    }[mix]
    return torch.multinomial(weights, num_segments, replacement=True, generator=generator).tolist()


def step_runs(lengths: list[int], slots: list[int], base_every: int = 0) -> list[tuple[int, int]]:
    """(slot, num_tokens) runs; with base_every > 0 every base_every-th segment uses no adapter."""
    return [
        (-1 if base_every and index % base_every == base_every - 1 else slot, length)
        for index, (slot, length) in enumerate(zip(slots, lengths, strict=True))
    ]


def slot_buffers(num_slots: int, ranks: tuple[int, ...], dtype: torch.dtype, seed: int = 1):
    """Stacked A [N, R, in] and B [N, out, R], zero-padded past each slot's rank (ranks cycle over the
    slots), and scalings [N] float32 as PEFT's alpha / r."""
    generator = torch.Generator().manual_seed(seed)
    max_rank = max(ranks)
    lora_a = torch.zeros(num_slots, max_rank, IN_FEATURES)
    lora_b = torch.zeros(num_slots, OUT_FEATURES, max_rank)
    scalings = torch.empty(num_slots)
    for slot in range(num_slots):
        rank = ranks[slot % len(ranks)]
        lora_a[slot, :rank] = torch.randn(rank, IN_FEATURES, generator=generator) / math.sqrt(IN_FEATURES)
        lora_b[slot, :, :rank] = torch.randn(OUT_FEATURES, rank, generator=generator) / math.sqrt(rank)
        scalings[slot] = 16.0 / rank * (slot + 1) / num_slots
    return lora_a.to(dtype), lora_b.to(dtype), scalings


def activations(num_tokens: int, features: int, dtype: torch.dtype, seed: int = 2) -> torch.Tensor:
    return torch.randn(num_tokens, features, generator=torch.Generator().manual_seed(seed)).to(dtype)


def naive_lora(x, y, lora_a, lora_b, scalings, runs) -> torch.Tensor:
    """y + scaling * B (A x), row by row in float64, straight from the (slot, num_tokens) runs."""
    expected = y.double().clone()
    row_slots = [slot for slot, length in runs for _ in range(length)]
    for row, slot in enumerate(row_slots):
        if slot >= 0:
            a, b = lora_a[slot].double(), lora_b[slot].double()
            expected[row] += scalings[slot].double() * (b @ (a @ x[row].double()))
    return expected


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def test_kernels_run_in_the_interpreter_on_cpu_tensors():
    assert isinstance(lora_kernels._shrink_kernel, InterpretedFunction)
    meta = build_lora_metadata([(0, 3)])
    lora_a, _, _ = slot_buffers(1, (4,), torch.float32)
    shrunk = lora_kernels.shrink(activations(3, IN_FEATURES, torch.float32), lora_a, meta)
    assert shrunk.device.type == "cpu" and shrunk.abs().sum() > 0


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shrink_matches_reference(dtype, rank, batch):
    lengths = BATCHES[batch]
    runs = step_runs(lengths, adapter_slots("uniform", len(lengths), NUM_SLOTS), base_every=4)
    meta = build_lora_metadata(runs)
    lora_a, _, _ = slot_buffers(NUM_SLOTS, RANKS[rank], dtype)
    x = activations(meta.num_tokens, IN_FEATURES, dtype)
    shrunk = lora_kernels.shrink(x, lora_a, meta)
    assert shrunk.dtype == torch.float32 and shrunk.shape == (meta.num_tokens, max(RANKS[rank]))
    assert_close(shrunk, shrink_reference(x, lora_a, meta), dtype)


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("rank", list(RANKS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_expand_matches_reference(dtype, rank, batch):
    lengths = BATCHES[batch]
    runs = step_runs(lengths, adapter_slots("uniform", len(lengths), NUM_SLOTS), base_every=4)
    meta = build_lora_metadata(runs)
    _, lora_b, scalings = slot_buffers(NUM_SLOTS, RANKS[rank], dtype)
    shrunk = activations(meta.num_tokens, max(RANKS[rank]), torch.float32, seed=3)
    y = activations(meta.num_tokens, OUT_FEATURES, dtype)
    expected = y.clone()
    expand_reference(expected, shrunk, lora_b, scalings, meta)
    lora_kernels.expand(y, shrunk, lora_b, scalings, meta)
    assert_close(y, expected, dtype)


@pytest.mark.parametrize("base_every", [0, 3], ids=["all-adapters", "base-rows-interleaved"])
@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("ops", list(OPS))
def test_shrink_then_expand_equals_the_per_row_formula(ops, mix, base_every):
    shrink, expand = OPS[ops]
    lengths = BATCHES["mixed"]
    runs = step_runs(lengths, adapter_slots(mix, len(lengths), 8), base_every)
    meta = build_lora_metadata(runs)
    dtype = torch.bfloat16
    lora_a, lora_b, scalings = slot_buffers(8, RANKS["mixed"], dtype)
    x = activations(meta.num_tokens, IN_FEATURES, dtype)
    y = activations(meta.num_tokens, OUT_FEATURES, dtype, seed=4)
    expected = naive_lora(x, y, lora_a, lora_b, scalings, runs)
    expand(y, shrink(x, lora_a, meta), lora_b, scalings, meta)
    assert_close(y, expected, dtype)


def test_packed_torch_path_matches_reference():
    """The CPU backend (adapters packed per fused projection: A stacked, B block-diagonal with the
    scaling folded in) has the reference's semantics, slice by slice, whichever modules an adapter
    targets and whatever its rank."""
    ranks = (4, 16, 8)
    q_a, q_b, scalings = slot_buffers(3, ranks, torch.float32, seed=1)
    v_a, v_b, _ = slot_buffers(3, ranks, torch.float32, seed=2)
    targets = ({"q_proj"}, {"v_proj"}, {"q_proj", "v_proj"})  # per slot
    stacked = {"q_proj": (q_a, q_b), "v_proj": (v_a, v_b)}
    for module, (a, b) in stacked.items():  # a module a slot does not target is all zeros there
        for slot, wanted in enumerate(targets):
            if module not in wanted:
                a[slot].zero_()
                b[slot].zero_()
    layout = {"qv_proj": (("q_proj", 0, OUT_FEATURES), ("v_proj", OUT_FEATURES, OUT_FEATURES))}
    packed = PackedLoraSlots(layout, num_slots=3, dtype=torch.float32, device=torch.device("cpu"))
    for slot, (rank, wanted) in enumerate(zip(ranks, targets, strict=True)):
        modules = {
            m: (stacked[m][0][slot, :rank].clone(), stacked[m][1][slot, :, :rank].clone()) for m in wanted
        }
        packed.write(slot, LoraAdapter(f"a{slot}", 1, rank, float(scalings[slot]), layers=(modules,)))
    meta = build_lora_metadata([(1, 5), (-1, 2), (0, 1), (2, 7), (1, 3)])
    x = activations(meta.num_tokens, IN_FEATURES, torch.float32)
    fused = activations(meta.num_tokens, 2 * OUT_FEATURES, torch.float32, seed=5)  # [T, q | v]
    expected = fused.clone()
    for offset, (a, b) in zip((0, OUT_FEATURES), stacked.values(), strict=True):
        expand_reference(expected, shrink_reference(x, a, meta), b, scalings, meta, offset, OUT_FEATURES)
    threads = torch.get_num_threads()
    packed.batch(meta).add(0, "qv_proj", x, fused)  # its GEMMs run on one thread, then it gives them back
    assert torch.get_num_threads() == threads
    assert_close(fused, expected, torch.float32)
    assert torch.equal(fused[5:7], activations(meta.num_tokens, 2 * OUT_FEATURES, torch.float32, seed=5)[5:7])


def test_segments_spanning_many_blocks(monkeypatch):
    """Small blocks: long segments take several token blocks (short ones return early), rank 64 several
    rank blocks, and every feature dimension several masked steps."""
    for name in ("_MAX_BLOCK_M", "_MAX_BLOCK_R", "_BLOCK_K", "_BLOCK_N"):
        monkeypatch.setattr(lora_kernels, name, 16)
    runs = [(2, 37), (-1, 4), (0, 1), (5, 20)]
    meta = build_lora_metadata(runs)
    lora_a, lora_b, scalings = slot_buffers(NUM_SLOTS, RANKS["mixed"], torch.float32)
    x = activations(meta.num_tokens, IN_FEATURES, torch.float32)
    y = activations(meta.num_tokens, OUT_FEATURES, torch.float32, seed=6)
    expected = naive_lora(x, y, lora_a, lora_b, scalings, runs)
    shrunk = lora_kernels.shrink(x, lora_a, meta)
    assert_close(shrunk, shrink_reference(x, lora_a, meta), torch.float32)
    lora_kernels.expand(y, shrunk, lora_b, scalings, meta)
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("ops", list(OPS))
def test_expand_touches_only_its_output_slice(ops):
    """A fused qkv output is targeted slice by slice; the columns either side stay bit-identical."""
    shrink, expand = OPS[ops]
    runs = [(0, 2), (-1, 3), (3, 6)]
    meta = build_lora_metadata(runs)
    lora_a, lora_b, scalings = slot_buffers(4, (8,), torch.bfloat16)
    x = activations(meta.num_tokens, IN_FEATURES, torch.bfloat16)
    fused = activations(meta.num_tokens, 3 * OUT_FEATURES, torch.bfloat16, seed=7)  # [T, q | k | v]
    before = fused.clone()
    middle = slice(OUT_FEATURES, 2 * OUT_FEATURES)
    expected = naive_lora(x, fused[:, middle], lora_a, lora_b, scalings, runs)
    expand(
        fused, shrink(x, lora_a, meta), lora_b, scalings, meta, out_offset=OUT_FEATURES, out_size=OUT_FEATURES
    )
    assert torch.equal(fused[:, :OUT_FEATURES], before[:, :OUT_FEATURES])
    assert torch.equal(fused[:, 2 * OUT_FEATURES :], before[:, 2 * OUT_FEATURES :])
    assert torch.equal(fused[3:5], before[3:5])  # the segment without an adapter
    assert_close(fused[:, middle], expected, torch.bfloat16)


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched with grid {grid}")


def test_step_without_lora_launches_nothing(monkeypatch):
    monkeypatch.setattr(lora_kernels, "_shrink_kernel", _NoLaunch())
    monkeypatch.setattr(lora_kernels, "_expand_kernel", _NoLaunch())
    meta = build_lora_metadata([(-1, 4), (-1, 0), (-1, 3)])
    assert not meta.has_lora and meta.num_active_segments == 0 and meta.max_segment_length == 0
    lora_a, lora_b, scalings = slot_buffers(2, (8,), torch.float16)
    x = activations(7, IN_FEATURES, torch.float16)
    y = activations(7, OUT_FEATURES, torch.float16)
    before = y.clone()
    shrunk = lora_kernels.shrink(x, lora_a, meta)
    lora_kernels.expand(y, shrunk, lora_b, scalings, meta)
    assert torch.equal(shrunk, torch.zeros(7, 8)) and torch.equal(y, before)


def test_empty_step_launches_nothing(monkeypatch):
    monkeypatch.setattr(lora_kernels, "_shrink_kernel", _NoLaunch())
    meta = build_lora_metadata([])
    lora_a, _, _ = slot_buffers(2, (8,), torch.float32)
    assert lora_kernels.shrink(torch.empty(0, IN_FEATURES), lora_a, meta).shape == (0, 8)


def test_metadata_merges_runs_of_one_slot_and_drops_empty_ones():
    meta = build_lora_metadata([(3, 2), (3, 1), (-1, 0), (-1, 4), (0, 0), (1, 5), (-1, 1), (1, 2)])
    assert meta.segments == ((0, 3, 3), (3, 4, -1), (7, 5, 1), (12, 1, -1), (13, 2, 1))
    assert meta.segment_starts.tolist() == [0, 3, 7, 12, 13]
    assert meta.segment_lengths.tolist() == [3, 4, 5, 1, 2]
    assert meta.segment_slots.tolist() == [3, -1, 1, -1, 1]
    assert meta.active_segments.tolist() == [0, 2, 4]
    assert (meta.num_tokens, meta.max_segment_length, meta.max_slot, meta.has_lora) == (15, 5, 3, True)
    assert all(t.dtype == torch.int32 for t in (meta.segment_starts, meta.active_segments))


@pytest.mark.parametrize(
    ("runs", "message"),
    [([(0, -1)], "num_tokens >= 0"), ([(-2, 3)], "slot >= -1")],
)
def test_metadata_rejects_bad_runs(runs, message):
    with pytest.raises(ValueError, match=message):
        build_lora_metadata(runs)


def test_metadata_rejects_segments_that_do_not_cover_the_step():
    good = build_lora_metadata([(0, 2), (1, 3)])
    fields = {name: getattr(good, name) for name in good.__dataclass_fields__}
    with pytest.raises(ValueError, match="breaks the cover"):
        LoraStepMetadata(**{**fields, "segments": ((0, 2, 0), (3, 2, 1))})
    with pytest.raises(ValueError, match="cover \\[0, 5\\) but the step has 6"):
        LoraStepMetadata(**{**fields, "num_tokens": 6})
    with pytest.raises(ValueError, match="disagree with the segments"):
        LoraStepMetadata(**{**fields, "has_lora": False})
    with pytest.raises(ValueError, match="active_segments must be a contiguous int32"):
        LoraStepMetadata(**{**fields, "active_segments": good.active_segments.long()})


def _shrink_case(**changes):
    meta = build_lora_metadata([(0, 3), (2, 2)])
    lora_a, _, _ = slot_buffers(3, (8,), torch.bfloat16)
    args = {"x": activations(5, IN_FEATURES, torch.bfloat16), "lora_a": lora_a, "meta": meta}
    return {**args, **changes}


def _expand_case(**changes):
    meta = build_lora_metadata([(0, 3), (2, 2)])
    _, lora_b, scalings = slot_buffers(3, (8,), torch.bfloat16)
    args = {
        "y": activations(5, 2 * OUT_FEATURES, torch.bfloat16),
        "shrunk": torch.zeros(5, 8),
        "lora_b": lora_b,
        "scalings": scalings,
        "meta": meta,
    }
    return {**args, **changes}


SHRINK_ERRORS: dict[str, tuple[Callable[[], dict], str]] = {
    "x-not-2d": (
        lambda: _shrink_case(x=torch.zeros(5, 2, IN_FEATURES, dtype=torch.bfloat16)),
        "x must be a 2-D",
    ),
    "in-features": (lambda: _shrink_case(x=torch.zeros(5, 8, dtype=torch.bfloat16)), "in_features"),
    "dtype-mismatch": (lambda: _shrink_case(x=torch.zeros(5, IN_FEATURES)), "lora_a is torch.bfloat16 but x"),
    "unsupported-dtype": (
        lambda: _shrink_case(
            x=torch.zeros(5, IN_FEATURES, dtype=torch.int32), lora_a=torch.zeros(3, 8, IN_FEATURES)
        ),
        "supported: float32",
    ),
    "not-contiguous": (
        lambda: _shrink_case(x=torch.zeros(IN_FEATURES, 5, dtype=torch.bfloat16).t()),
        "x must be contiguous",
    ),
    "token-count": (
        lambda: _shrink_case(x=torch.zeros(4, IN_FEATURES, dtype=torch.bfloat16)),
        "cover 5 tokens",
    ),
    "slot-out-of-range": (
        lambda: _shrink_case(meta=build_lora_metadata([(0, 3), (3, 2)])),
        "slot 3 is in use but the slot buffers hold only 3",
    ),
    "device": (
        lambda: _shrink_case(meta=build_lora_metadata([(0, 5)], device="meta")),
        "metadata is on meta",
    ),
}
EXPAND_ERRORS: dict[str, tuple[Callable[[], dict], str]] = {
    "shrunk-dtype": (
        lambda: _expand_case(shrunk=torch.zeros(5, 8, dtype=torch.bfloat16)),
        "shrunk must be float32",
    ),
    "shrunk-rank": (lambda: _expand_case(shrunk=torch.zeros(5, 4)), "expected \\(5, 8\\)"),
    "scalings-size": (lambda: _expand_case(scalings=torch.ones(2)), "2 entries for 3 slots"),
    "scalings-dtype": (
        lambda: _expand_case(scalings=torch.ones(3, dtype=torch.float64)),
        "scalings must be float32",
    ),
    "slice-past-end": (lambda: _expand_case(out_offset=OUT_FEATURES + 1), "does not fit y's 272"),
    "negative-offset": (lambda: _expand_case(out_offset=-1), "does not fit"),
    "out-size": (lambda: _expand_case(out_size=OUT_FEATURES - 1), "differs from lora_b's out_features"),
    "y-feature-stride": (
        lambda: _expand_case(y=torch.zeros(2 * OUT_FEATURES, 5, dtype=torch.bfloat16).t()),
        "y's rows must be contiguous",
    ),
    "lora-b-dtype": (lambda: _expand_case(y=torch.zeros(5, OUT_FEATURES, dtype=torch.float16)), "lora_b is"),
    "slot-out-of-range": (
        lambda: _expand_case(meta=build_lora_metadata([(0, 2), (4, 3)])),
        "slot 4 is in use",
    ),
}


@pytest.mark.parametrize("case", list(SHRINK_ERRORS))
@pytest.mark.parametrize("ops", list(OPS))
def test_shrink_rejects_bad_arguments(ops, case):
    make_args, message = SHRINK_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        OPS[ops][0](**make_args())


@pytest.mark.parametrize("case", list(EXPAND_ERRORS))
@pytest.mark.parametrize("ops", list(OPS))
def test_expand_rejects_bad_arguments(ops, case):
    make_args, message = EXPAND_ERRORS[case]
    with pytest.raises(ValueError, match=message):
        OPS[ops][1](**make_args())


def test_packing_groups_layers_yet_keeps_each_layers_own_targets():
    """Layers are packed together by the modules they target (PEFT's layers_to_transform, or a
    target missing in some layers): each layer still adds exactly its own modules' deltas."""
    generator = torch.Generator().manual_seed(3)
    rank, scaling = 4, 0.5

    def pair() -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.randn(rank, IN_FEATURES, generator=generator)
        return a, torch.randn(OUT_FEATURES, rank, generator=generator)

    layers = ({"q_proj": pair()}, {}, {"q_proj": pair(), "v_proj": pair()}, {"q_proj": pair()})
    layout = {"qv_proj": (("q_proj", 0, OUT_FEATURES), ("v_proj", OUT_FEATURES, OUT_FEATURES))}
    packed = PackedLoraSlots(layout, num_slots=1, dtype=torch.float32, device=torch.device("cpu"))
    packed.write(0, LoraAdapter("a", 1, rank, scaling, layers=layers))
    meta = build_lora_metadata([(0, 3)])
    x = activations(meta.num_tokens, IN_FEATURES, torch.float32)
    for layer, modules in enumerate(layers):
        fused = torch.zeros(meta.num_tokens, 2 * OUT_FEATURES)
        packed.batch(meta).add(layer, "qv_proj", x, fused)
        expected = torch.zeros_like(fused)
        for name, offset, size in layout["qv_proj"]:
            if name in modules:
                a, b = modules[name]
                expected[:, offset : offset + size] = scaling * (x @ a.t()) @ b.t()
        assert_close(fused, expected, torch.float32)
