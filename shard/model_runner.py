"""Run one engine step on the model: lay the scheduled chunks out as a flat token batch, build the
per-step attention and LoRA metadata once, run the forward pass, and compute logits only for the rows
that need them (the last row of each chunk that samples, plus prompt rows when log-probs are asked).

Under tensor parallelism the first rank plans the step (`StepInputs`, plain lists) and hands it to the
other ranks before running it; every rank then builds the same tensors from it and runs the same
forward pass, so no rank schedules on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from loraplex.shard.attention import ChunkLayout, build_metadata
from loraplex.shard.lora_ops import NO_SLOT, build_lora_metadata
from loraplex.shard.lora_stacked import StackedLoraWeights
from loraplex.shard.lora_torch import PackedLoraSlots
from loraplex.shard.model import LlamaModel
from loraplex.shard.scheduler import ScheduledChunk


@dataclass(frozen=True)
class StepInputs:
    """One step's forward pass, as every rank runs it."""

    token_ids: list[int]
    positions: list[int]
    layouts: list[ChunkLayout]
    lora_runs: list[tuple[int, int]]  # (adapter slot, tokens) per chunk in row order; [] = no adapter
    logit_rows: list[int]  # rows whose logits are wanted


class StepPeers(Protocol):
    """The other tensor-parallel ranks: they run each step the first rank runs."""

    def run_step(self, inputs: StepInputs) -> None: ...


@dataclass(frozen=True)
class ChunkResult:
    chunk: ScheduledChunk
    next_token_logits: torch.Tensor | None  # [vocab] fp32 on CPU, when the chunk samples
    prompt_logprobs: list[float]  # log-probs of the prompt tokens this chunk covers that had none yet


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        block_size: int,
        device: torch.device,
        lora_weights: StackedLoraWeights | PackedLoraSlots,
        peers: StepPeers | None = None,
    ) -> None:
        """lora_weights: the adapter slots of the LoRA backend (Triton kernels or plain torch); peers:
        the other tensor-parallel ranks, told each step before this rank runs it."""
        self.model = model
        self.block_size = block_size
        self.device = device
        self.lora_weights = lora_weights
        self.peers = peers

    def run(self, chunks: list[ScheduledChunk]) -> list[ChunkResult]:
        # Tokens sharing an adapter slot sit next to each other, so each adapter is one row segment.
        ordered = sorted(chunks, key=lambda c: c.seq.lora_slot)
        token_ids: list[int] = []
        positions: list[int] = []
        layouts: list[ChunkLayout] = []
        for chunk in ordered:
            seq, row = chunk.seq, len(token_ids)
            end = chunk.start + chunk.num_new_tokens
            token_ids.extend(seq.token_ids[chunk.start : end])
            positions.extend(range(chunk.start, end))
            layouts.append(ChunkLayout(row, chunk.num_new_tokens, chunk.start, seq.block_table))
        rows, wanted = _logit_rows(ordered, layouts)
        lora_runs = []
        if any(chunk.seq.lora_slot != NO_SLOT for chunk in ordered):
            lora_runs = [(chunk.seq.lora_slot, chunk.num_new_tokens) for chunk in ordered]
        inputs = StepInputs(token_ids, positions, layouts, lora_runs, rows)
        if self.peers is not None:
            self.peers.run_step(inputs)
        logits = self.execute(inputs)
        return _results(ordered, wanted, logits)

    @torch.inference_mode()
    def execute(self, inputs: StepInputs) -> torch.Tensor | None:
        """Run the forward pass; the wanted rows' logits [N, vocab] on CPU (None where no row is
        wanted, and on every rank but the first)."""
        attn = build_metadata(inputs.layouts, self.block_size, self.model.config.sliding_window, self.device)
        lora = None  # no adapter in the step: no LoRA work, no kernel launch
        if inputs.lora_runs:
            lora = self.lora_weights.batch(build_lora_metadata(inputs.lora_runs, self.device))
        hidden = self.model(self._tensor(inputs.token_ids), self._tensor(inputs.positions), attn, lora)
        if not inputs.logit_rows:
            return None
        logits = self.model.compute_logits(hidden[self._tensor(inputs.logit_rows)])
        return None if logits is None else logits.cpu()

    def _tensor(self, values: list[int]) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor


# (first logits row, position of the first prompt row, prompt rows, sample row or -1) per chunk
_Wanted = list[tuple[int, int, int, int]]


def _logit_rows(ordered: list[ScheduledChunk], layouts: list[ChunkLayout]) -> tuple[list[int], _Wanted]:
    """The step rows whose logits are needed, and where each chunk's rows sit among them."""
    rows: list[int] = []
    wanted: _Wanted = []
    for chunk, layout in zip(ordered, layouts, strict=True):
        seq = chunk.seq
        first = len(rows)
        # A recompute after preemption starts again at 0: skip the positions whose log-probs are in.
        first_position = max(chunk.start, seq.num_prompt_logprobs)
        num_prompt_rows = 0
        if seq.wants_all_prompt_logits:
            # Row at position p predicts token p + 1; only rows whose next token is a prompt token.
            last = min(chunk.start + chunk.num_new_tokens, seq.num_prompt_tokens - 1)
            num_prompt_rows = max(0, last - first_position)
            row = layout.row + first_position - chunk.start
            rows.extend(range(row, row + num_prompt_rows))
        sample_row = -1
        if chunk.samples:
            sample_row = len(rows)
            rows.append(layout.row + chunk.num_new_tokens - 1)
        wanted.append((first, first_position, num_prompt_rows, sample_row))
    return rows, wanted


def _results(
    ordered: list[ScheduledChunk], wanted: _Wanted, logits: torch.Tensor | None
) -> list[ChunkResult]:
    if logits is None:
        return [ChunkResult(chunk, None, []) for chunk in ordered]
    results = []
    for chunk, (first, first_position, num_prompt_rows, sample_row) in zip(ordered, wanted, strict=True):
        prompt_logprobs: list[float] = []
        if num_prompt_rows:
            targets = torch.tensor(
                chunk.seq.token_ids[first_position + 1 : first_position + 1 + num_prompt_rows]
            )
            picked = torch.log_softmax(logits[first : first + num_prompt_rows], dim=-1)
            prompt_logprobs = picked.gather(1, targets[:, None]).squeeze(1).tolist()
        results.append(ChunkResult(chunk, logits[sample_row] if sample_row >= 0 else None, prompt_logprobs))
    return results
