"""Run one engine step on the model: lay the scheduled chunks out as a flat token batch, build the
per-step attention and LoRA metadata once, run the forward pass, and compute logits only for the rows
that need them (the last row of each chunk that samples, plus prompt rows when log-probs are asked)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.shard.attention import ChunkLayout, build_metadata
from loraplex.shard.lora_ops import NO_SLOT, build_lora_metadata
from loraplex.shard.lora_stacked import KernelLoraBatch, StackedLoraWeights
from loraplex.shard.lora_torch import PackedLoraSlots, TorchLoraBatch
from loraplex.shard.model import LlamaModel
from loraplex.shard.scheduler import ScheduledChunk


@dataclass(frozen=True)
class ChunkResult:
    chunk: ScheduledChunk
    next_token_logits: torch.Tensor | None  # [vocab] fp32 on CPU, when the chunk samples
    prompt_logprobs: list[float]  # log-probs of prompt tokens start+1 .. covered by this chunk


class ModelRunner:
    def __init__(
        self,
        model: LlamaModel,
        block_size: int,
        device: torch.device,
        lora_weights: StackedLoraWeights | PackedLoraSlots,
    ) -> None:
        """lora_weights: the adapter slots of the LoRA backend (Triton kernels or plain torch)."""
        self.model = model
        self.block_size = block_size
        self.device = device
        self.lora_weights = lora_weights

    @torch.inference_mode()
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
        attn = build_metadata(layouts, self.block_size, self.model.config.sliding_window, self.device)
        hidden = self.model(
            self._tensor(token_ids), self._tensor(positions), attn, self._lora(ordered)
        )  # [T, H]
        return self._logits(ordered, layouts, hidden)

    def _lora(self, ordered: list[ScheduledChunk]) -> KernelLoraBatch | TorchLoraBatch | None:
        if all(chunk.seq.lora_slot == NO_SLOT for chunk in ordered):
            return None  # no adapter in the step: no LoRA work, no kernel launch
        runs = [(chunk.seq.lora_slot, chunk.num_new_tokens) for chunk in ordered]
        return self.lora_weights.batch(build_lora_metadata(runs, self.device))

    def _logits(
        self, ordered: list[ScheduledChunk], layouts: list[ChunkLayout], hidden: torch.Tensor
    ) -> list[ChunkResult]:
        rows: list[int] = []
        wanted: list[tuple[int, int, int, int]] = []  # (first logits row, prompt rows, sample row, chunk)
        for i, (chunk, layout) in enumerate(zip(ordered, layouts, strict=True)):
            seq = chunk.seq
            first = len(rows)
            num_prompt_rows = 0
            if seq.wants_all_prompt_logits:
                # Row at position p predicts token p + 1; only rows whose next token is a prompt token.
                last = min(chunk.start + chunk.num_new_tokens, seq.num_prompt_tokens - 1)
                num_prompt_rows = max(0, last - chunk.start)
                rows.extend(range(layout.row, layout.row + num_prompt_rows))
            sample_row = -1
            if chunk.samples:
                sample_row = len(rows)
                rows.append(layout.row + chunk.num_new_tokens - 1)
            wanted.append((first, num_prompt_rows, sample_row, i))
        if not rows:
            return [ChunkResult(chunk, None, []) for chunk in ordered]
        logits = self.model.compute_logits(hidden[self._tensor(rows)]).cpu()  # [N, vocab]
        results = []
        for first, num_prompt_rows, sample_row, i in wanted:
            chunk = ordered[i]
            prompt_logprobs: list[float] = []
            if num_prompt_rows:
                targets = torch.tensor(
                    chunk.seq.token_ids[chunk.start + 1 : chunk.start + 1 + num_prompt_rows]
                )
                picked = torch.log_softmax(logits[first : first + num_prompt_rows], dim=-1)
                prompt_logprobs = picked.gather(1, targets[:, None]).squeeze(1).tolist()
            results.append(
                ChunkResult(chunk, logits[sample_row] if sample_row >= 0 else None, prompt_logprobs)
            )
        return results

    def _tensor(self, values: list[int]) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=torch.long)
        if self.device.type == "cuda":
            return tensor.pin_memory().to(self.device, non_blocking=True)
        return tensor
