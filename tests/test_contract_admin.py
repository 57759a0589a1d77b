"""The Adapters admin service as its contract (protos/v1/adapters.proto) states it, against the router's
own serve() and a real redis-server: errors a client can act on, and nothing written when refused."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from test_router import _with_router_channel

from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc


async def _refusal(redis_url: str, namespace: str, request: adapters_pb2.CreateAdapterRequest):
    """Create's error, and what List shows after it."""

    async def create(channel: grpc.aio.Channel):
        admin = adapters_pb2_grpc.AdaptersStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await admin.Create(request, timeout=10)
        return refused.value, await admin.List(adapters_pb2.ListAdaptersRequest(), timeout=10)

    return await _with_router_channel(redis_url, namespace, create)


def test_a_source_the_router_cannot_read_is_invalid_argument_not_internal(redis_url, namespace, tmp_path):
    """An OSError reading the source (a name past the filesystem's 255 bytes here; for a router not
    running as root, a directory it may not enter) came back INTERNAL with a traceback in the log."""
    source = tmp_path / ("a" * 300)
    request = adapters_pb2.CreateAdapterRequest(name="unreadable", source=str(source))
    error, listed = asyncio.run(_refusal(redis_url, namespace, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "cannot read `source`: File name too long" in error.details()
    assert list(listed.adapters) == []


def test_a_relative_source_is_refused_as_each_process_would_read_its_own(redis_url, namespace, tmp_path):
    """A relative path passed the router's check from the router's working directory, then each shard
    looked for it in its own: grpcurl users got an adapter that loaded on some processes or none."""
    request = adapters_pb2.CreateAdapterRequest(name="relative", source="adapters/support")
    error, listed = asyncio.run(_refusal(redis_url, namespace, request))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "'adapters/support' is a relative path" in error.details() and "absolute path" in error.details()
    assert list(listed.adapters) == []
