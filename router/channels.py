"""One gRPC channel per shard address, and on it one GenerateMany stream, reused across requests:
a call or a stub per request costs the router a visible share of what it spends per request.

Shards come and go (a restarted pod registers a new address), so a channel no request has used for
`idle_close_s` is closed, once nothing is in flight on it; a later request to that address opens a
new one.

Every channel pings its shard when the shard has sent nothing for `keepalive_s` (protos.rpc), so a
shard that freezes without closing its connections fails its requests with UNAVAILABLE within about
1.5 x keepalive_s (retried elsewhere when no token had streamed) instead of holding them.

A connection attempt gives up after `connect_timeout_s` (gRPC's default is 20 s): a shard that
cannot be reached, its packets dropped (a partition, a node gone), would otherwise hold every request
sent to it for that long, past most callers' deadlines, rather than failing it (UNAVAILABLE) over to
another shard while it still has time. A shard's messages are taken whatever their size: one over
gRPC's 4 MiB default would end the stream and every request on it."""

from __future__ import annotations

import asyncio
import time

import grpc

from loraplex.protos.rpc import KEEPALIVE_S, client_options
from loraplex.protos.v1 import shard_pb2_grpc
from loraplex.router.shard_stream import ShardStream

IDLE_CLOSE_S = 300.0
CONNECT_TIMEOUT_S = 2.0  # a shard on the same network connects in milliseconds


class ShardChannels:
    def __init__(
        self,
        idle_close_s: float = IDLE_CLOSE_S,
        keepalive_s: float = KEEPALIVE_S,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._options = [
            *client_options(keepalive_s),
            ("grpc.min_reconnect_backoff_ms", int(connect_timeout_s * 1000)),  # the connect timeout
            ("grpc.max_receive_message_length", -1),
        ]
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self._streams: dict[str, ShardStream] = {}
        self._idle_close_s = idle_close_s
        self._last_used: dict[str, float] = {}
        self._next_sweep = time.monotonic() + idle_close_s
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address, options=self._options)
        return self._channels[address]

    def stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = shard_pb2_grpc.ShardStub(self.get(address))
        return stub

    def stream(self, address: str) -> ShardStream:
        """The open GenerateMany stream to the shard; a new one if the last has ended."""
        now = self._last_used[address] = time.monotonic()
        if now >= self._next_sweep:
            self._close_idle(now)
        stream = self._streams.get(address)
        if stream is None or (stream.closed and not stream.unsupported):
            stream = self._streams[address] = ShardStream(self.stub(address), address)
        return stream

    @property
    def addresses(self) -> list[str]:
        """The shard addresses a channel is open to."""
        return sorted(self._channels)

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self._streams.values()), *self._closing)
        for channel in self._channels.values():
            await channel.close()
        self._streams.clear()
        self._channels.clear()
        self._stubs.clear()
        self._last_used.clear()

    def _close_idle(self, now: float) -> None:
        """Close, in the background, the channels unused for idle_close_s with nothing in flight."""
        self._next_sweep = now + self._idle_close_s / 2
        for address, used in list(self._last_used.items()):
            stream = self._streams.get(address)
            if now - used < self._idle_close_s or (stream is not None and stream.busy):
                continue
            del self._last_used[address]
            self._stubs.pop(address, None)
            self._streams.pop(address, None)
            channel = self._channels.pop(address, None)
            task = asyncio.create_task(_close(stream, channel))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)


async def _close(stream: ShardStream | None, channel: grpc.aio.Channel | None) -> None:
    if stream is not None:
        await stream.close()
    if channel is not None:
        await channel.close()
