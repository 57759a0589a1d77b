"""The bounds of the sampling parameters the shard accepts, their check, and a request's fields with
the shard's defaults. Free of torch, so the gateway imports the bounds and refuses a value past them at
its edge (a 400 naming the field), and the router's Jobs/Submit runs the check before it queues a job
that could only fail."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

from loraplex.protos.v1 import common_pb2

MAX_TOP_LOGPROBS = 20
# Every stop string is looked for in the text after each token, on the engine thread, so a long list
# slows every request in the batch (300,000 short strings made a neighbour's tokens 15x slower). The
# gateway's cap (TGI's max_stop_sequences) holds for gRPC callers too.
MAX_STOP_STRINGS = 16
# A repetition penalty outside this range could overflow the penalised scores (a logit divided by
# 1e-40 is inf); values used in practice lie between 1 and 2.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def as_float32(value: float) -> float:
    """value as the gRPC messages carry it (a proto `float`): 0.01 arrives as 0.009999999776."""
    return struct.unpack("f", struct.pack("f", value))[0]


def sampling_fields(parameters: common_pb2.SamplingParameters) -> dict[str, Any]:
    """A request's sampling fields but max_new_tokens (which the shard resolves against its context),
    unset optional ones at their defaults: top_p and repetition_penalty 1.0 (off), no seed."""
    return {
        "temperature": parameters.temperature,
        "top_p": parameters.top_p if parameters.HasField("top_p") else 1.0,
        "top_k": parameters.top_k,
        "seed": parameters.seed if parameters.HasField("seed") else None,
        "repetition_penalty": (
            parameters.repetition_penalty if parameters.HasField("repetition_penalty") else 1.0
        ),
        "stop": tuple(parameters.stop),
        "stop_token_ids": tuple(parameters.stop_token_ids),
        "ignore_eos": parameters.ignore_eos,
        "top_logprobs": parameters.top_logprobs,
    }


def check_sampling(
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    repetition_penalty: float,
    top_logprobs: int,
    stop: Sequence[str],
    **unbounded: object,  # the other fields (seed, stop_token_ids, ignore_eos) have no bounds to check
) -> None:
    """ValueError naming the first parameter out of bounds. The bounds keep finite logits giving
    finite scores (a NaN or infinite score would make sampling raise in the middle of a step)."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not (temperature >= 0.0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    low, high = REPETITION_PENALTY_RANGE
    # compared as float32, the wire's width: the bound itself arrives a hair below it
    if not as_float32(low) <= repetition_penalty <= high:
        raise ValueError(f"repetition_penalty must be in [{low}, {high}] (1 = off), got {repetition_penalty}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise ValueError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {top_logprobs}")
    if len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
    if any(not text for text in stop):
        raise ValueError("stop strings must not be empty")
