"""The shard server: one replica of the base model serving generation requests."""
