"""The registry on Redis. This module owns the whole key schema:

    {ns}:adapter:{name}   hash    AdapterRecord fields (target_modules as JSON), and `write`: the id
                                  of the create or update that last wrote it
    {ns}:adapter-version:{name}
                          string  the last version issued under name: create INCRs it (so the
                                  first is 1), update and delete set it to the record's version. It
                                  outlives a delete, so a name created again goes on past its old
                                  versions, which shards may still hold
    {ns}:adapters         set     names of every adapter in the catalogue
    {ns}:shard:{id}       string  ShardRecord JSON, written by each heartbeat with PX = ttl
    {ns}:shards           zset    shard id -> expiry time of its last heartbeat, on Redis's clock (an
                                  index, pruned by each heartbeat; the string key's TTL is the truth)
    {ns}:events:{db}      channel JSON {"op": "create"|"update"|"delete", "name", "version"}; pub/sub
                                  is server-wide, so the channel names the database the keys are in

Create, update and delete run as Lua scripts, so a record, the index and the event change together.
Heartbeats run as one too, timed by Redis's clock: shards' and routers' clocks need not agree.
Placement (adapter -> shards with tier) is read from the shard records: a shard that stops
heartbeating takes its placements with it when its key expires.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from loraplex.registry.records import AdapterRecord, ShardRecord

# KEYS: record, index, version counter. ARGV: channel, name, write id, then the record's field/value
# pairs. Each script returns the record as it wrote it (or found it, for delete), so callers never
# re-read a record another change may have replaced since; an empty reply means nothing was changed.
# A command whose connection drops is sent again (reconnect_once), though it may have run: a create or
# update that finds its own write id in the record answers with it instead of failing or writing again.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'write') == ARGV[3] then return redis.call('HGETALL', KEYS[1]) end
  return {}
end
local version = redis.call('INCR', KEYS[3])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[1], 'version', version, 'write', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[1], cjson.encode({op='create', name=ARGV[2], version=version}))
return redis.call('HGETALL', KEYS[1])
"""

# Update and delete set the counter to the record's version: the same number, unless the record
# predates the counter, which then catches up.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
if redis.call('HGET', KEYS[1], 'write') == ARGV[3] then return redis.call('HGETALL', KEYS[1]) end
local version = redis.call('HINCRBY', KEYS[1], 'version', 1)
redis.call('SET', KEYS[3], version)
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('HSET', KEYS[1], 'write', ARGV[3])
redis.call('PUBLISH', ARGV[1], cjson.encode({op='update', name=ARGV[2], version=version}))
return redis.call('HGETALL', KEYS[1])
"""

# ARGV: channel, name. A delete sent again after it ran answers NOT_FOUND: the record is gone.
_DELETE = """
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then return fields end
redis.call('SET', KEYS[3], redis.call('HGET', KEYS[1], 'version'))
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
redis.call('PUBLISH', ARGV[1], cjson.encode({op='delete', name=ARGV[2]}))
return fields
"""


# KEYS: shard record, index. ARGV: shard id, record JSON, ttl in ms.
_HEARTBEAT = """
local now = redis.call('TIME')
now = tonumber(now[1]) + tonumber(now[2]) / 1000000
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]) / 1000, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
"""


class AdapterExists(KeyError):
    pass


def reconnect_once() -> Retry:
    """A command that fails on a dead connection is sent once more on a fresh one: after Redis
    restarts, each pooled connection fails once. Timeouts are not retried: the command may have run."""
    return Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,))


class AdapterNotFound(KeyError):
    pass


class Registry:
    """Catalogue and membership operations over one Redis connection pool."""

    def __init__(self, url: str, namespace: str = "loraplex") -> None:
        self._redis = redis.from_url(
            url, decode_responses=True, socket_timeout=5, socket_connect_timeout=2, retry=reconnect_once()
        )
        self._url = url
        self._ns = namespace
        self._db = self._redis.connection_pool.connection_kwargs.get("db", 0)
        self._heartbeat = self._redis.register_script(_HEARTBEAT)
        self._create = self._redis.register_script(_CREATE)
        self._update = self._redis.register_script(_UPDATE)
        self._delete = self._redis.register_script(_DELETE)

    def _adapter_key(self, name: str) -> str:
        return f"{self._ns}:adapter:{name}"

    def _shard_key(self, shard_id: str) -> str:
        return f"{self._ns}:shard:{shard_id}"

    @property
    def _adapters_key(self) -> str:
        return f"{self._ns}:adapters"

    @property
    def _shards_key(self) -> str:
        return f"{self._ns}:shards"

    @property
    def events_channel(self) -> str:
        return f"{self._ns}:events:{self._db}"

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    # --- catalogue -------------------------------------------------------------------------------

    async def create_adapter(self, record: AdapterRecord) -> AdapterRecord:
        """Add a new adapter; its version is one past any earlier adapter of the same name."""
        now = time.time()
        record = replace(record, created_at=now, updated_at=now)
        written = await self._create(
            keys=self._catalogue_keys(record.name), args=self._args(record.name, record.to_hash())
        )
        if not written:
            raise AdapterExists(f"adapter {record.name!r} already exists; use update to change its source")
        return _from_reply(written)

    async def update_adapter(self, record: AdapterRecord) -> AdapterRecord:
        """Replace the adapter's source and metadata; the version goes up by one."""
        fields = record.to_hash()
        for kept in ("name", "version", "created_at"):
            fields.pop(kept)
        fields["updated_at"] = str(time.time())
        written = await self._update(
            keys=self._catalogue_keys(record.name), args=self._args(record.name, fields)
        )
        if not written:
            raise AdapterNotFound(f"adapter {record.name!r} is not registered; create it first")
        return _from_reply(written)

    async def delete_adapter(self, name: str) -> AdapterRecord:
        deleted = await self._delete(keys=self._catalogue_keys(name), args=[self.events_channel, name])
        if not deleted:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return _from_reply(deleted)

    def _catalogue_keys(self, name: str) -> list[str]:
        """The KEYS of the create, update and delete scripts."""
        return [self._adapter_key(name), self._adapters_key, f"{self._ns}:adapter-version:{name}"]

    def _args(self, name: str, fields: dict[str, str]) -> list[str]:
        return [self.events_channel, name, uuid.uuid4().hex, *_flatten(fields)]

    async def get_adapter(self, name: str) -> AdapterRecord:
        fields = await self._redis.hgetall(self._adapter_key(name))
        if not fields:
            raise AdapterNotFound(f"adapter {name!r} is not registered")
        return AdapterRecord.from_hash(fields)

    async def list_adapters(self) -> list[AdapterRecord]:
        names = sorted(await self._redis.smembers(self._adapters_key))
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(self._adapter_key(name))
            rows = await pipe.execute()
        return [AdapterRecord.from_hash(fields) for fields in rows if fields]

    async def events(self, on_subscribed: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[dict]:
        """Catalogue change events as they are published; raises if the connection drops, since events
        published until the caller subscribes again are lost. on_subscribed runs once the subscription
        is in place: a resync there misses no change."""
        # a client of its own that never retries: the pool's would reconnect and resubscribe silently
        client = redis.from_url(
            self._url, decode_responses=True, socket_connect_timeout=2, retry=Retry(NoBackoff(), 0)
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(self.events_channel)
            if on_subscribed is not None:
                await on_subscribed()
            async for message in pubsub.listen():
                if message["type"] == "message":
                    yield json.loads(message["data"])
        finally:
            await pubsub.aclose()
            await client.aclose()

    # --- membership ------------------------------------------------------------------------------

    async def heartbeat(self, shard: ShardRecord, ttl_s: float) -> None:
        await self._heartbeat(
            keys=[self._shard_key(shard.shard_id), self._shards_key],
            args=[shard.shard_id, shard.to_json(), int(ttl_s * 1000)],
        )

    async def remove_shard(self, shard_id: str) -> None:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(self._shard_key(shard_id))
            pipe.zrem(self._shards_key, shard_id)
            await pipe.execute()

    async def live_shards(self) -> list[ShardRecord]:
        ids = await self._redis.zrange(self._shards_key, 0, -1)  # expired ones read as None below
        if not ids:
            return []
        rows = await self._redis.mget([self._shard_key(shard_id) for shard_id in ids])
        return [ShardRecord.from_json(row) for row in rows if row]


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _from_reply(fields: list[str]) -> AdapterRecord:
    """The record from a script's HGETALL reply (a flat field, value list)."""
    return AdapterRecord.from_hash(dict(zip(fields[::2], fields[1::2], strict=True)))
