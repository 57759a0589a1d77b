"""The bounds of the sampling parameters the shard accepts. Free of torch, so the gateway imports them
and refuses a value past them at its edge (a 400 naming the field) before it crosses the mesh."""

from __future__ import annotations

import struct

MAX_TOP_LOGPROBS = 20
# A repetition penalty outside this range could overflow the penalised scores (a logit divided by
# 1e-40 is inf); values used in practice lie between 1 and 2.
REPETITION_PENALTY_RANGE = (0.01, 100.0)


def as_float32(value: float) -> float:
    """value as the gRPC messages carry it (a proto `float`): 0.01 arrives as 0.009999999776."""
    return struct.unpack("f", struct.pack("f", value))[0]
