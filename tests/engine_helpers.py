"""Helpers for engine tests: reference outputs from transformers and last-step logits from our model."""

from __future__ import annotations

import queue

import torch

from loraplex.shard.engine import Engine, EngineOutput, EngineRequest
from loraplex.shard.outputs import OutputProcessor, RequestFailed, TokenOutput
from loraplex.shard.sampling import SampledToken, SamplingParams
from loraplex.shard.sequence import Sequence


def tokens(outputs: list[EngineOutput]) -> list[int]:
    assert all(isinstance(output, TokenOutput) for output in outputs), outputs
    return [output.token.token_id for output in outputs]  # type: ignore[union-attr]


def greedy_requests(prompts: list[list[int]], max_new_tokens: int, **params) -> list[EngineRequest]:
    return [
        EngineRequest(f"r{i}", ids, SamplingParams(max_new_tokens=max_new_tokens, **params))
        for i, ids in enumerate(prompts)
    ]


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    prompt = torch.tensor([prompt_ids])
    output = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        **kwargs,
    )
    return output[0, len(prompt_ids) :].tolist()


def engine_last_logits(
    engine: Engine, prompts: list[list[int]], next_tokens: list[int], adapters: list | None = None
) -> list[torch.Tensor]:
    """Prefill every prompt together (in chunks if the budget says so), append one token to each and
    run one shared decode step; return that step's logits per prompt, [vocab] each. adapters[i] (a
    LoraAdapter or None) applies to prompt i."""
    adapters = adapters or [None] * len(prompts)
    seqs = [
        Sequence(f"l{i}", list(ids), len(ids), SamplingParams(max_new_tokens=2), adapter=adapter)
        for i, (ids, adapter) in enumerate(zip(prompts, adapters, strict=True))
    ]
    for seq in seqs:
        engine.scheduler.add(seq)
    try:
        while any(seq.num_computed_tokens < seq.num_tokens for seq in seqs):
            schedule = engine.scheduler.schedule()
            engine.runner.run(schedule.chunks)
            engine.scheduler.advance(schedule.chunks)
        for seq, token in zip(seqs, next_tokens, strict=True):
            seq.token_ids.append(token)
        schedule = engine.scheduler.schedule()
        results = {r.chunk.seq.request_id: r.next_token_logits for r in engine.runner.run(schedule.chunks)}
        engine.scheduler.advance(schedule.chunks)
    finally:
        for seq in seqs:
            engine.scheduler.finish(seq)
    return [results[seq.request_id] for seq in seqs]


def reference_last_logits(model, prompt_ids: list[int], next_token: int) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[*prompt_ids, next_token]])).logits[0, -1].float()


def collect_outputs(engine: Engine, request: EngineRequest, timeout: float = 60) -> list[EngineOutput]:
    """Submit to a started engine and wait for the request's outputs up to its last one."""
    outputs: queue.SimpleQueue[EngineOutput] = queue.SimpleQueue()
    engine.submit(request, outputs.put)
    collected = []
    while True:
        output = outputs.get(timeout=timeout)
        collected.append(output)
        if isinstance(output, RequestFailed) or output.finish_reason:
            return collected


def feed_until_finish(
    processor: OutputProcessor, prompt: list[int], generated: list[int]
) -> tuple[str, TokenOutput]:
    """Hand the generated tokens to processor one by one, as the engine does, until one finishes the
    request (or they run out): the text released, and the last output."""
    token_ids, text = list(prompt), ""
    for token_id in generated:
        token_ids.append(token_id)
        output = processor.process(SampledToken(token_id, 0.0, ()), token_ids, len(prompt))
        text += output.text
        if output.finish_reason:
            break
    return text, output
