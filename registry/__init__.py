"""The Redis-backed registry: adapter catalogue and shard membership."""
