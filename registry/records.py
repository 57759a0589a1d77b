"""Plain records the registry stores; protobuf conversion happens at the service edges."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

TIERS = ("gpu", "cpu", "disk")


@dataclass(frozen=True)
class AdapterRecord:
    """A catalogue entry: what the adapter is, not where it is held."""

    name: str
    base_model: str
    source: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    checksum: str
    version: int = 1
    created_at: float = 0.0
    updated_at: float = 0.0

    def to_hash(self) -> dict[str, str]:
        fields = asdict(self)
        fields["target_modules"] = json.dumps(list(self.target_modules))
        return {key: str(value) for key, value in fields.items()}

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> AdapterRecord:
        return cls(
            name=fields["name"],
            base_model=fields["base_model"],
            source=fields["source"],
            rank=int(fields["rank"]),
            alpha=float(fields["alpha"]),
            target_modules=tuple(json.loads(fields["target_modules"])),
            checksum=fields["checksum"],
            version=int(fields["version"]),
            created_at=float(fields["created_at"]),
            updated_at=float(fields["updated_at"]),
        )


@dataclass(frozen=True)
class HeldAdapter:
    """One adapter version a shard holds, and in which tier."""

    name: str
    version: int
    tier: str


@dataclass(frozen=True)
class ShardRecord:
    """What a shard reports in each heartbeat: where to reach it and how busy it is."""

    shard_id: str
    address: str
    base_model: str
    max_context: int = 0
    max_running_requests: int = 1
    running_requests: int = 0
    waiting_requests: int = 0
    queued_tokens: int = 0
    adapters: tuple[HeldAdapter, ...] = field(default_factory=tuple)
    reported_at: float = 0.0  # time.time() when the figures were taken (0: unknown)
    # what an adapter must fit here, so routers can refuse one no shard could load before registering
    # it: the largest rank (0: unknown), layers, and one layer's (module, in, out) features
    max_lora_rank: int = 0
    num_layers: int = 0
    lora_features: tuple[tuple[str, int, int], ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardRecord:
        """The record; fields a newer release added are ignored, so a rolling upgrade reads both."""
        values = _known_fields(cls, json.loads(text))
        values["adapters"] = tuple(
            HeldAdapter(**_known_fields(HeldAdapter, held)) for held in values.get("adapters", ())
        )
        values["lora_features"] = tuple(tuple(feature) for feature in values.get("lora_features", ()))
        return cls(**values)

    def tier_of(self, adapter: str) -> str | None:
        """The best tier in which this shard holds any version of adapter, or None."""
        tiers = [held.tier for held in self.adapters if held.name == adapter]
        return min(tiers, key=TIERS.index) if tiers else None


def _known_fields(cls: type, values: dict) -> dict:
    """values without the keys that are no field of the dataclass cls."""
    return {item.name: values[item.name] for item in fields(cls) if item.name in values}
