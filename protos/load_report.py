"""A shard's load, sent back as each request ends (as gRPC's ORCA load reports are): in the trailing
metadata of a Generate call, and as `outstanding_requests` on a GenerateMany request's last event.
Each router then learns a shard's outstanding requests whenever one of its own requests to it ends,
not only from heartbeats, which are up to a heartbeat interval plus a registry refresh old. Routers
that do not coordinate see one another's traffic sooner, and keep closer to the load bound."""

from __future__ import annotations

from collections.abc import Iterable

OUTSTANDING_REQUESTS_KEY = "loraplex-outstanding-requests"


def load_metadata(outstanding_requests: int) -> tuple[tuple[str, str], ...]:
    return ((OUTSTANDING_REQUESTS_KEY, str(outstanding_requests)),)


def outstanding_requests(metadata: Iterable[tuple[str, str | bytes]] | None) -> int | None:
    """The count a shard reported, or None if it sent none (an older shard, or a stand-in)."""
    for key, value in metadata or ():
        if key == OUTSTANDING_REQUESTS_KEY:
            try:
                return max(0, int(value))
            except ValueError:
                return None
    return None
