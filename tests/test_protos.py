import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.protos.rpc import (
    MAX_STATUS_MESSAGE_BYTES,
    MIN_KEEPALIVE_S,
    _fitted,
    create_server,
    keepalive_options,
    set_serving,
)
from loraplex.tools import gen_protos


def test_committed_stubs_match_the_proto_files():
    assert gen_protos.main(["--check"]) == 0


def test_a_quiet_stream_survives_keepalive_pings_every_second():
    """A router pings a shard whose GenerateMany stream has nothing to say. gRPC's default server
    policy (pings at most every 5 minutes without data) answers the third such ping with GOAWAY
    too_many_pings, ending the stream after ~3 s; create_server accepts pings down to MIN_KEEPALIVE_S.
    (Health/Watch through create_server's error interceptor also failed: it writes rather than yields.)"""

    async def scenario() -> None:
        server, port, health = create_server("127.0.0.1:0", [])
        await server.start()
        await set_serving(health, [])
        try:
            channel = grpc.aio.insecure_channel(
                f"127.0.0.1:{port}", options=keepalive_options(MIN_KEEPALIVE_S)
            )
            async with channel:
                call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
                assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
                with pytest.raises(TimeoutError):  # no GOAWAY, no error: the stream is still open
                    await asyncio.wait_for(call.read(), timeout=5 * MIN_KEEPALIVE_S)
        finally:
            await server.stop(grace=0)

    asyncio.run(scenario())


def test_keepalives_more_often_than_servers_accept_are_refused():
    with pytest.raises(ValueError, match="keepalive must be at least 1 s"):
        keepalive_options(0.5)


def test_a_second_server_cannot_share_a_taken_port():
    """gRPC binds with SO_REUSEPORT by default: a second router or shard on a taken port came up and
    answered a random share of the first one's calls."""

    async def scenario() -> None:
        first, port, _ = create_server("127.0.0.1:0", [])
        await first.start()
        try:
            with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{port}: is another server"):
                create_server(f"127.0.0.1:{port}", [])
        finally:
            await first.stop(None)

    asyncio.run(scenario())


def test_a_method_the_servicer_leaves_unimplemented_is_unimplemented_not_internal():
    """grpc.health.v1.Health/List: the servicer's default raises NotImplementedError, a RuntimeError,
    which the error interceptor turned into INTERNAL."""

    async def scenario() -> grpc.StatusCode:
        server, port, _ = create_server("127.0.0.1:0", [])
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest(), timeout=10)
                return raised.value.code()
        finally:
            await server.stop(None)

    assert asyncio.run(scenario()) == grpc.StatusCode.UNIMPLEMENTED


def test_a_status_message_past_what_a_trailer_carries_is_cut_on_a_character_boundary():
    """Non-ASCII bytes triple when percent-encoded: the cut message stays under the 16 KiB of metadata a
    client accepts, whole characters only, and says how much was left out."""
    assert _fitted("short") == "short"
    cut = _fitted("é" * 10_000)
    assert len(cut.encode()) < MAX_STATUS_MESSAGE_BYTES + 40 and 3 * MAX_STATUS_MESSAGE_BYTES < 16 << 10
    assert cut.startswith("é" * (MAX_STATUS_MESSAGE_BYTES // 2)) and cut.endswith(
        "... (7952 more characters)"
    )
