"""The Adapters admin API of two routers writing one registry at once, against a real redis-server and
real gRPC on loopback: each race has one clear outcome, every reply says what was written, and each
router's snapshot ends on the registry's last word."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from loraplex.protos.rpc import create_server
from loraplex.protos.v1 import adapters_pb2, adapters_pb2_grpc
from loraplex.registry.store import Registry
from loraplex.router.admin import AdaptersService
from loraplex.router.snapshot import SnapshotKeeper

from peft_fixtures import write_peft_adapter


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> list[str]:
    """Four adapters with different weights (so different checksums)."""
    root = tmp_path_factory.mktemp("adapters")
    return [str(write_peft_adapter(root / f"a{seed}", tiny_model_dir, seed=seed)) for seed in range(4)]


@asynccontextmanager
async def _routers(
    redis_url: str, namespace: str, count: int = 2
) -> AsyncIterator[tuple[list[adapters_pb2_grpc.AdaptersStub], list[SnapshotKeeper]]]:
    """count routers' admin services on one registry: their stubs and snapshots."""
    stubs, keepers, closers = [], [], []
    for _ in range(count):
        registry = Registry(redis_url, namespace)
        keeper = SnapshotKeeper(registry, refresh_interval_s=60)
        await keeper.refresh()
        server, port, _ = create_server("127.0.0.1:0", [])
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersService(registry, keeper, "m"), server)
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        stubs.append(adapters_pb2_grpc.AdaptersStub(channel))
        keepers.append(keeper)
        closers.append((channel, server, registry))
    try:
        yield stubs, keepers
    finally:
        for channel, server, registry in closers:
            await channel.close()
            await server.stop(grace=0)
            await registry.close()


async def _outcome(call) -> object:
    """The reply, or the status code it failed with."""
    try:
        return await call
    except grpc.aio.AioRpcError as error:
        return error.code()


def test_creates_of_one_name_through_two_routers_have_one_winner(redis_url, namespace, sources):
    async def scenario():
        async with _routers(redis_url, namespace) as (stubs, keepers):
            calls = [
                stubs[i % 2].Create(adapters_pb2.CreateAdapterRequest(name="x", source=sources[i]))
                for i in range(4)
            ]
            outcomes = await asyncio.gather(*(_outcome(call) for call in calls))
            won = [outcome for outcome in outcomes if not isinstance(outcome, grpc.StatusCode)]
            assert len(won) == 1 and won[0].version == 1
            assert outcomes.count(grpc.StatusCode.ALREADY_EXISTS) == 3
            stored = await stubs[0].Get(adapters_pb2.GetAdapterRequest(name="x"))
            assert (stored.source, stored.checksum) == (won[0].source, won[0].checksum)
            for keeper in keepers:
                await keeper.refresh()
                assert keeper.current.adapters["x"].checksum == won[0].checksum

    asyncio.run(scenario())


def test_updates_racing_through_two_routers_each_get_their_own_version(redis_url, namespace, sources):
    async def scenario():
        async with _routers(redis_url, namespace) as (stubs, keepers):
            await stubs[0].Create(adapters_pb2.CreateAdapterRequest(name="x", source=sources[0]))
            calls = [
                stubs[i % 2].Update(adapters_pb2.UpdateAdapterRequest(name="x", source=sources[i % 4]))
                for i in range(8)
            ]
            updated = await asyncio.gather(*calls)
            assert sorted(record.version for record in updated) == list(range(2, 10)), "none lost"
            last = max(updated, key=lambda record: record.version)
            stored = await stubs[1].Get(adapters_pb2.GetAdapterRequest(name="x"))
            assert (stored.version, stored.checksum) == (9, last.checksum)
            for index, keeper in enumerate(keepers):  # in whatever order its replies came back
                own = [record.version for record in updated[index::2]]
                assert keeper.current.adapters["x"].version == max(own), "its snapshot never went back"
                await keeper.refresh()
                assert keeper.current.adapters["x"].version == 9

    asyncio.run(scenario())


def test_an_update_racing_a_delete_lands_before_it_or_is_not_found(redis_url, namespace, sources):
    async def scenario():
        async with _routers(redis_url, namespace) as (stubs, keepers):
            for round in range(4):
                name = f"x{round}"
                await stubs[0].Create(adapters_pb2.CreateAdapterRequest(name=name, source=sources[0]))
                update, delete = await asyncio.gather(
                    _outcome(
                        stubs[0].Update(adapters_pb2.UpdateAdapterRequest(name=name, source=sources[1]))
                    ),
                    _outcome(stubs[1].Delete(adapters_pb2.DeleteAdapterRequest(name=name))),
                )
                if update == grpc.StatusCode.NOT_FOUND:
                    assert delete.version == 1
                else:
                    assert (update.version, delete.version, delete.checksum) == (2, 2, update.checksum)
                assert await _outcome(stubs[0].Get(adapters_pb2.GetAdapterRequest(name=name))) == (
                    grpc.StatusCode.NOT_FOUND
                )
            for keeper in keepers:
                await keeper.refresh()
                assert keeper.current.adapters == {}

    asyncio.run(scenario())


def test_names_no_adapter_can_have_are_refused_clearly_by_every_call(redis_url, namespace, sources):
    """A name past 16 KiB came back as RESOURCE_EXHAUSTED 'received metadata size exceeds hard limit'
    (the message quoted it whole); one with a colon or a non-ASCII letter as NOT_FOUND."""

    async def scenario():
        async with _routers(redis_url, namespace, count=1) as (stubs, _):
            (admin,) = stubs
            for name in ("x" * 100_000, "ns:adapter", "café"):
                for call in (
                    admin.Create(adapters_pb2.CreateAdapterRequest(name=name, source=sources[0])),
                    admin.Update(adapters_pb2.UpdateAdapterRequest(name=name, source=sources[0])),
                    admin.Delete(adapters_pb2.DeleteAdapterRequest(name=name)),
                    admin.Get(adapters_pb2.GetAdapterRequest(name=name)),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await call
                    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                    assert "letters, digits" in refused.value.details()

    asyncio.run(scenario())
