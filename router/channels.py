"""One gRPC channel per shard address, and on it one GenerateMany stream, reused across requests:
a call or a stub per request costs the router a visible share of what it spends per request."""

from __future__ import annotations

import asyncio

import grpc

from loraplex.protos.v1 import shard_pb2_grpc
from loraplex.router.shard_stream import ShardStream


class ShardChannels:
    def __init__(self) -> None:
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stubs: dict[str, shard_pb2_grpc.ShardStub] = {}
        self._streams: dict[str, ShardStream] = {}

    def get(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(address)
        return self._channels[address]

    def stub(self, address: str) -> shard_pb2_grpc.ShardStub:
        stub = self._stubs.get(address)
        if stub is None:
            stub = self._stubs[address] = shard_pb2_grpc.ShardStub(self.get(address))
        return stub

    def stream(self, address: str) -> ShardStream:
        """The open GenerateMany stream to the shard; a new one if the last has ended."""
        stream = self._streams.get(address)
        if stream is None or (stream.closed and not stream.unsupported):
            stream = self._streams[address] = ShardStream(self.stub(address), address)
        return stream

    async def close(self) -> None:
        await asyncio.gather(*(stream.close() for stream in self._streams.values()))
        for channel in self._channels.values():
            await channel.close()
        self._streams.clear()
        self._channels.clear()
        self._stubs.clear()
