"""The async job queue on Redis. This module owns the jobs key schema:

    {ns}:jobs          stream  one entry per job to run: {"job": job id}; consumer group `workers`,
                               created from id 0 (MKSTREAM) so entries added before the first
                               worker are delivered too. An entry is acknowledged and deleted in
                               the same script that finishes its job, so the stream holds exactly
                               the backlog: entries not yet delivered plus delivered, unacknowledged.
    {ns}:job:{id}      hash    state (queued | running | succeeded | failed), request (serialized
                               GenerateRequest), callback_url, created_at, started_at, finished_at
                               (unix seconds), attempts (deliveries so far), result (serialized
                               GenerateResponse, when succeeded), error_code (gRPC status name) and
                               error_message (when failed), trace_context (JSON object: the
                               submitting request's W3C trace context, `traceparent` and the like,
                               absent if it had none). Expires `queued_ttl_s` after submission
                               (generous: a backlog may take a while), then `ttl_s` after it finishes.

Submit, start and finish each run as one Lua script, so a record and its stream entry change together.
A job finishes exactly once from the client's view: the finish script stores a result only while the
job is unfinished, so when a slow worker and the one that reclaimed its entry both finish the job, the
first result stays and the second is dropped (and the entry acknowledged either way).
Consumers are deleted from the group once they own no pending entry and have been idle a while
(workers get a new consumer name per process, so the group would otherwise grow with every restart).
Needs Redis 7 or later (XAUTOCLAIM's list of deleted entries, the group's lag in XINFO GROUPS).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from functools import partial

import redis.asyncio as redis
from google.protobuf.message import DecodeError
from redis.exceptions import ResponseError

from loraplex.protos.v1 import common_pb2, jobs_pb2
from loraplex.registry.store import reconnect_once

GROUP = "workers"
DEFAULT_TTL_S = 24 * 3600.0
DEFAULT_QUEUED_TTL_S = 7 * 24 * 3600.0
TraceContext = tuple[tuple[str, str], ...]  # W3C trace context fields as (key, value) pairs
_FINISHED = (b"succeeded", b"failed")
_STATES = {
    b"queued": jobs_pb2.JOB_STATE_QUEUED,
    b"running": jobs_pb2.JOB_STATE_RUNNING,
    b"succeeded": jobs_pb2.JOB_STATE_SUCCEEDED,
    b"failed": jobs_pb2.JOB_STATE_FAILED,
}

# KEYS: record, stream. ARGV: job id, ttl ms, then the record's field/value pairs. A job id already
# recorded is queued once only: a submit retried after its reply was lost must not queue it twice.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  return false
end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('XADD', KEYS[2], '*', 'job', ARGV[1])
"""

# KEYS: record, stream. ARGV: group, entry id, now. An entry naming no job of ours (no record, or a key
# that is not a job's hash), or a job already finished, is only acknowledged.
_START = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  return false
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'succeeded' or state == 'failed' or redis.call('HEXISTS', KEYS[1], 'request') == 0 then
  redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
  redis.call('XDEL', KEYS[2], ARGV[2])
  return false
end
redis.call('HSET', KEYS[1], 'state', 'running', 'started_at', ARGV[3])
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
return {
  redis.call('HGET', KEYS[1], 'request'), attempts, redis.call('HGET', KEYS[1], 'callback_url') or '',
  redis.call('HGET', KEYS[1], 'trace_context') or ''
}
"""

# KEYS: record, stream. ARGV: group, entry id, ttl ms, then the outcome's field/value pairs.
# Stores the outcome only if the job is still unfinished; acknowledges the entry in every case.
_FINISH = """
local state = redis.call('HGET', KEYS[1], 'state')
local stored = 0
if state and state ~= 'succeeded' and state ~= 'failed' then
  redis.call('HSET', KEYS[1], unpack(ARGV, 4))
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  stored = 1
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
return stored
"""

# KEYS: stream. ARGV: group, consumer, entry ids. Resets the idle time of the entries this consumer
# still owns, so a job that runs long is not reclaimed from a live worker; never takes one back.
_TOUCH = """
local touched = 0
for i = 3, #ARGV do
  local entry = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if entry[1] and entry[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    touched = touched + 1
  end
end
return touched
"""

# KEYS: stream. ARGV: group, min idle ms, consumer ('' = any). Deletes consumers idle that long that own
# no pending entry; one that owns some is kept, as deleting it would drop its entries (and their jobs).
_PRUNE = """
local consumers = redis.pcall('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
if consumers.err then
  return 0
end
local removed = 0
for _, fields in ipairs(consumers) do
  local info = {}
  for i = 1, #fields, 2 do
    info[fields[i]] = fields[i + 1]
  end
  if info.pending == 0 and info.idle >= tonumber(ARGV[2]) and (ARGV[3] == '' or info.name == ARGV[3]) then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], info.name)
    removed = removed + 1
  end
end
return removed
"""


@dataclass(frozen=True)
class Delivery:
    """A job handed to one consumer: finish it with complete or fail, quoting entry_id."""

    entry_id: str
    job_id: str
    request: common_pb2.GenerateRequest
    attempts: int  # deliveries so far, this one included
    callback_url: str = ""  # where the worker POSTs the outcome once stored ("": nowhere)
    trace_context: TraceContext = ()  # the submitting request's, as gRPC metadata pairs ((): none)


class JobQueue:
    """Submit, run and look up async jobs over one Redis connection pool."""

    def __init__(
        self,
        url: str,
        namespace: str = "loraplex",
        ttl_s: float = DEFAULT_TTL_S,
        queued_ttl_s: float = DEFAULT_QUEUED_TTL_S,
    ) -> None:
        # socket_timeout must outlast a blocking XREADGROUP: keep read()'s block_ms well under 10 s.
        self._redis = redis.from_url(url, socket_timeout=10, socket_connect_timeout=2, retry=reconnect_once())
        self._ns = namespace
        self._ttl_ms = int(ttl_s * 1000)
        self._queued_ttl_ms = int(max(queued_ttl_s, ttl_s) * 1000)
        self._group_ready = False
        self._submit = self._redis.register_script(_SUBMIT)
        self._start = self._redis.register_script(_START)
        self._finish = self._redis.register_script(_FINISH)
        self._touch = self._redis.register_script(_TOUCH)
        self._prune = self._redis.register_script(_PRUNE)

    @property
    def stream_key(self) -> str:
        return f"{self._ns}:jobs"

    def record_key(self, job_id: str) -> str:
        return f"{self._ns}:job:{job_id}"

    async def close(self) -> None:
        await self._redis.aclose()

    # --- clients ---------------------------------------------------------------------------------

    async def submit(
        self,
        request: common_pb2.GenerateRequest,
        callback_url: str = "",
        trace_context: Iterable[tuple[str, str]] | None = None,
    ) -> str:
        """Record the job and queue it, atomically; returns the job id. trace_context (the submitting
        request's, as gRPC metadata pairs) comes back in each Delivery, for the worker's trace to link to."""
        job_id = uuid.uuid4().hex
        fields = {
            "state": "queued",
            "request": request.SerializeToString(),
            "callback_url": callback_url,
            "created_at": repr(time.time()),
            "attempts": 0,
        }
        if trace_context:
            fields["trace_context"] = json.dumps(dict(trace_context))
        await self._submit(
            keys=[self.record_key(job_id), self.stream_key],
            args=[job_id, self._queued_ttl_ms, *_flatten(fields)],
        )
        return job_id

    async def get(self, job_id: str) -> jobs_pb2.Job | None:
        """The job's state and outcome; None if the id is unknown or its record expired."""
        fields = await self._redis.hgetall(self.record_key(job_id))
        if not fields:
            return None
        job = jobs_pb2.Job(job_id=job_id, state=_STATES.get(fields.get(b"state", b""), 0))
        job.created_at.FromNanoseconds(_nanoseconds(fields.get(b"created_at")))
        if fields.get(b"finished_at"):
            job.finished_at.FromNanoseconds(_nanoseconds(fields[b"finished_at"]))
        if b"result" in fields:
            job.result.ParseFromString(fields[b"result"])
        if b"error_code" in fields:
            job.error.code = fields[b"error_code"].decode()
            job.error.message = fields.get(b"error_message", b"").decode()
        return job

    # --- workers ---------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Create the stream and its consumer group if missing (from id 0: earlier jobs count too)."""
        try:
            await self._redis.xgroup_create(self.stream_key, GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._group_ready = True

    async def read(self, consumer: str, count: int, block_ms: int) -> list[Delivery]:
        """Up to count jobs never delivered before, marked running; waits up to block_ms for one."""
        reply = await self._with_group(
            partial(
                self._redis.xreadgroup, GROUP, consumer, {self.stream_key: ">"}, count=count, block=block_ms
            )
        )
        entries = reply[0][1] if reply else []
        return await self._start_all(entries)

    async def reclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over up to count jobs delivered to some consumer but not acknowledged for min_idle_ms
        (its worker died), marked running. Entries whose job is gone or finished are only acknowledged."""
        deliveries: list[Delivery] = []
        cursor: bytes | str = "0-0"
        while len(deliveries) < count:
            cursor, claimed, deleted = await self._with_group(
                partial(
                    self._redis.xautoclaim,
                    self.stream_key,
                    GROUP,
                    consumer,
                    min_idle_ms,
                    cursor,
                    count=count - len(deliveries),
                )
            )
            if deleted:  # entries deleted from the stream while pending: nothing left to run
                await self._redis.xack(self.stream_key, GROUP, *deleted)
            deliveries += await self._start_all(claimed)
            if cursor in (b"0-0", "0-0"):
                break
        return deliveries

    async def mark_running(self, job_id: str, entry_id: str) -> Delivery | None:
        """Count a delivery and mark the job running; None (entry acknowledged) if there is nothing to
        run: the record expired or is not a job's, the job already finished, or its request is unreadable."""
        reply = await self._start(
            keys=[self.record_key(job_id), self.stream_key], args=[GROUP, entry_id, repr(time.time())]
        )
        if reply is None:
            return None
        payload, attempts, callback_url, trace_context = reply
        request = common_pb2.GenerateRequest()
        try:
            request.ParseFromString(payload)
        except DecodeError:
            await self.fail(job_id, entry_id, "INTERNAL", "the stored request is not a GenerateRequest")
            return None
        return Delivery(
            entry_id, job_id, request, int(attempts), callback_url.decode(), _trace_context(trace_context)
        )

    async def touch(self, consumer: str, entry_ids: list[str]) -> int:
        """Reset the idle time of entries still owned by consumer; returns how many it still owns."""
        if not entry_ids:
            return 0
        return await self._touch(keys=[self.stream_key], args=[GROUP, consumer, *entry_ids])

    async def prune_consumers(self, min_idle_ms: int, consumer: str = "") -> int:
        """Delete the group's consumers (or just `consumer`) idle min_idle_ms that own no pending entry;
        returns how many. Harmless to a live one: its next read recreates it."""
        return await self._prune(keys=[self.stream_key], args=[GROUP, min_idle_ms, consumer])

    async def complete(self, job_id: str, entry_id: str, response: common_pb2.GenerateResponse) -> bool:
        """Store the result and acknowledge; False if the job had already finished (result dropped)."""
        return await self._finish_job(
            job_id, entry_id, {"state": "succeeded", "result": response.SerializeToString()}
        )

    async def fail(self, job_id: str, entry_id: str, code: str, message: str) -> bool:
        """Store the error and acknowledge; False if the job had already finished (error dropped)."""
        return await self._finish_job(
            job_id, entry_id, {"state": "failed", "error_code": code, "error_message": message}
        )

    async def backlog(self) -> int:
        """Jobs not finished yet: entries not yet delivered (the group's lag) plus delivered but
        unacknowledged (pending). Redis reports no lag while a deleted entry sits past the group's last
        delivered id; the stream's length is then the same number, as finished entries are deleted."""
        try:
            groups = await self._redis.xinfo_groups(self.stream_key)
        except ResponseError:  # no stream yet
            return 0
        group = next((g for g in groups if g["name"] in (GROUP, GROUP.encode())), None)
        if group is None or group.get("lag") is None:
            return await self._redis.xlen(self.stream_key)
        return int(group["lag"]) + int(group["pending"])

    # --- internals -------------------------------------------------------------------------------

    async def _finish_job(self, job_id: str, entry_id: str, outcome: dict[str, str | bytes]) -> bool:
        outcome["finished_at"] = repr(time.time())
        stored = await self._finish(
            keys=[self.record_key(job_id), self.stream_key],
            args=[GROUP, entry_id, self._ttl_ms, *_flatten(outcome)],
        )
        return bool(stored)

    async def _start_all(self, entries: list) -> list[Delivery]:
        deliveries = []
        for entry_id, fields in entries:
            entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
            # not UTF-8: no job of ours (ids are hex), so its record lookup finds nothing and acks it
            job_id = (fields or {}).get(b"job", b"").decode(errors="replace")
            delivery = await self.mark_running(job_id, entry_id) if job_id else None
            if delivery is not None:
                deliveries.append(delivery)
            elif not job_id:  # not one of ours: drop it so it is not delivered again
                await self._redis.xack(self.stream_key, GROUP, entry_id)
                await self._redis.xdel(self.stream_key, entry_id)
        return deliveries

    async def _with_group(self, operation: Callable[[], Awaitable]):
        """Run a consumer-group command, creating the group first (or again, if the stream was
        deleted under us)."""
        if not self._group_ready:
            await self.ensure_group()
        try:
            return await operation()
        except ResponseError as error:
            if "NOGROUP" not in str(error):
                raise
            await self.ensure_group()
            return await operation()


def _flatten(fields: dict) -> list:
    return [item for pair in fields.items() for item in pair]


def _trace_context(stored: bytes) -> TraceContext:
    """The stored trace context's pairs; () for none (a record from before it was stored) or garbage."""
    try:
        fields = json.loads(stored) if stored else {}
    except ValueError:
        return ()
    if not isinstance(fields, dict):
        return ()
    return tuple((str(key), str(value)) for key, value in fields.items())


def _nanoseconds(seconds: bytes | None) -> int:
    return int(float(seconds or 0) * 1e9)
