"""One request's state inside the engine: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loraplex.shard.lora import LoraAdapter
from loraplex.shard.sampling import SamplingParams


@dataclass(frozen=True)
class SequenceTimes:
    """Wall-clock marks (time.time_ns()) the engine thread takes for tracing: cheap to take, and the
    service turns them into spans afterwards, so the engine never touches OpenTelemetry."""

    scheduled_ns: int  # first admitted into a batch (0: never)
    first_token_ns: int  # its first token sampled (0: none yet)
    finished_ns: int
    slot_hit: bool  # its adapter already had a slot at that first admission


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # prompt, then every generated token
    num_prompt_tokens: int
    params: SamplingParams
    adapter: LoraAdapter | None = None  # applied to this sequence's tokens
    want_prompt_logprobs: bool = False
    deadline: float | None = None  # time.monotonic() after which the request is dropped
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # content hashes of the full computed blocks
    # separates prefix-cache entries whose K/V differ: the adapter copy's uid, never its (name, version),
    # which may come back with other weights (a reset registry, an update of the source's files)
    cache_salt: int = 0
    num_preemptions: int = 0
    num_prompt_logprobs: int = 0  # prompt log-probs computed so far; a recompute after preemption skips them
    lora_slot: int = -1  # the adapter's slot while the sequence runs; -1: none (base model or waiting)
    scheduled_ns: int = 0  # see SequenceTimes
    first_token_ns: int = 0
    slot_hit: bool = False

    def __post_init__(self) -> None:
        if self.adapter is not None:
            self.cache_salt = self.adapter.uid

    def times(self, finished_ns: int) -> SequenceTimes:
        return SequenceTimes(self.scheduled_ns, self.first_token_ns, finished_ns, self.slot_hit)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def wants_all_prompt_logits(self) -> bool:
        """Prompt log-probs need every prompt position computed here, not taken from the cache, until
        each prompt token but the first has its log-prob (also across a preemption mid-prefill)."""
        return self.want_prompt_logprobs and self.num_prompt_logprobs < self.num_prompt_tokens - 1

    @property
    def num_remaining_tokens(self) -> int:
        """Tokens still to process or generate: what this sequence will cost the shard from now on."""
        return self.num_uncomputed + self.params.max_new_tokens - self.num_generated
