"""The router side of Shard/GenerateMany: one long-lived stream per shard carries all of this router's
requests to it (protos/generate_many.py says why).

A request is an id on the stream: a start message out, its chunks back as events, a cancel message if
its caller leaves first. When the stream breaks (the shard died or is draining) every request still
on it fails with UNAVAILABLE, which the router retries elsewhere if no chunk had streamed, as it
would a failed call; the next request opens a new stream. A shard too old to have GenerateMany
(mid-way through a rolling upgrade) is called with Generate, a call per request, and asked again
after UNSUPPORTED_RECHECK_S.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc

from loraplex.protos.generate_many import MAX_MESSAGE_BYTES, queued_batches
from loraplex.protos.load_report import outstanding_requests
from loraplex.protos.rpc import ServiceError
from loraplex.protos.telemetry import Metadata
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc

STATUS_CODES = {code.value[0]: code for code in grpc.StatusCode}
UNSUPPORTED_RECHECK_S = 60.0
DEADLINE_PASSED = "the caller's deadline had passed before the request could be sent to the shard"
UNIMPLEMENTED = grpc.StatusCode.UNIMPLEMENTED.value[0]  # only a stream the shard has no method for
MAX_ACTION_BYTES = MAX_MESSAGE_BYTES - 16  # a start alone, with its ShardStreamRequest around it


class ShardStream:
    def __init__(self, stub: shard_pb2_grpc.ShardStub, address: str) -> None:
        self.stub = stub
        self._address = address
        self._outbox: asyncio.Queue[shard_pb2.ShardStreamAction | None] = asyncio.Queue()
        self._requests: dict[int, _Inbox] = {}
        self._ids = itertools.count(1)
        self.unsupported_until = 0.0  # the shard has no GenerateMany: call Generate until then
        self._ended: shard_pb2.ShardStreamEvent | None = None  # what the stream's requests got as it ended
        self.unary_calls = 0  # Generate calls in flight for shards without GenerateMany
        self._call = stub.GenerateMany(self._messages())
        self._reader = asyncio.create_task(self._read())

    def generate(
        self, request: shard_pb2.ShardGenerateRequest, timeout: float | None, metadata: Metadata | None
    ) -> ShardCall:
        """A request, sent when its call's `chunks()` is first read (so a call never read costs the
        shard nothing and leaves nothing behind here)."""
        return ShardCall(self, request, timeout, metadata)

    def start(
        self, request: shard_pb2.ShardGenerateRequest, timeout: float | None, metadata: Metadata | None
    ) -> tuple[int, _Inbox]:
        """Send the request; its events arrive in the returned inbox until `forget`."""
        request_id = next(self._ids)
        inbox = _Inbox()
        if self.closed:  # ended since the caller was handed this stream: fail as the others did
            inbox.put(self._ended)
        elif timeout is not None and timeout <= 0:  # as a call fails; timeout_s 0 would mean none at all
            inbox.put(_end_event(grpc.StatusCode.DEADLINE_EXCEEDED, DEADLINE_PASSED))
        else:
            start = shard_pb2.ShardStreamAction(id=request_id, start=request, timeout_s=timeout or 0.0)
            if metadata:
                start.metadata.update(metadata)
            if (num_bytes := start.ByteSize()) > MAX_ACTION_BYTES:  # the shard would end the stream
                inbox.put(_end_event(grpc.StatusCode.INVALID_ARGUMENT, _too_large(num_bytes)))
            else:
                self._outbox.put_nowait(start)
        self._requests[request_id] = inbox
        return request_id, inbox

    @property
    def closed(self) -> bool:
        """The stream has ended; its requests got (and later ones get) `_ended`."""
        return self._ended is not None

    @property
    def unsupported(self) -> bool:
        return time.monotonic() < self.unsupported_until

    @property
    def busy(self) -> bool:
        """Requests are in flight on it (or beside it, as Generate calls)."""
        return bool(self._requests) or self.unary_calls > 0

    def forget(self, request_id: int, cancel: bool) -> None:
        del self._requests[request_id]
        if cancel and not self.closed:
            self._outbox.put_nowait(shard_pb2.ShardStreamAction(id=request_id, cancel=True))

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        self._call.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _messages(self) -> AsyncIterator[shard_pb2.ShardStreamRequest]:
        """Batched: each message written costs the router about as much as a request's routing."""
        async for actions in queued_batches(self._outbox, shard_pb2.ShardStreamAction.ByteSize):
            yield shard_pb2.ShardStreamRequest(actions=actions)

    async def _read(self) -> None:
        reason = "the router closed it"  # unless the stream ends on its own
        try:
            async for response in self._call:
                for event in response.events:
                    inbox = self._requests.get(event.id)
                    if inbox is not None:  # else a request this router has already let go of
                        inbox.put(event)
            reason = "the shard closed the stream (it is draining)"
        except grpc.aio.AioRpcError as error:
            reason = f"{error.code().name}: {error.details()}"
            if error.code() == grpc.StatusCode.UNIMPLEMENTED:
                self.unsupported_until = time.monotonic() + UNSUPPORTED_RECHECK_S
        finally:  # cancelled too (close): no request may wait on a stream that is gone
            self._end(reason)

    def _end(self, reason: str) -> None:
        self._outbox.put_nowait(None)  # ends _messages, else gRPC's writer task waits on it forever
        code = grpc.StatusCode.UNIMPLEMENTED if self.unsupported else grpc.StatusCode.UNAVAILABLE
        self._ended = _end_event(code, f"the stream to shard {self._address} ended: {reason}")
        for inbox in self._requests.values():
            inbox.put(self._ended)


class ShardCall:
    """One request on a ShardStream: its chunks, then `outstanding_requests`, the shard's load report
    (None when it sent none). A failure raises ServiceError with the shard's status."""

    def __init__(
        self,
        stream: ShardStream,
        request: shard_pb2.ShardGenerateRequest,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> None:
        self._stream = stream
        self._request = request
        self._timeout = timeout
        self._metadata = metadata
        self.outstanding_requests: int | None = None

    async def chunks(self) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        """Close it (`contextlib.aclosing`) when leaving early: that cancels the request on the shard."""
        if self._stream.unsupported:
            async for chunk in self._by_generate():
                yield chunk
            return
        request_id, inbox = self._stream.start(self._request, self._timeout, self._metadata)
        ended = False
        try:
            while True:
                events = await inbox.take()
                ended = events[-1].end  # the shard is done with it: leaving now cancels nothing
                for event in events:
                    if not event.end:
                        yield event.chunk
                        continue
                    if event.status_code == UNIMPLEMENTED:  # the stream never worked: no chunk came
                        async for chunk in self._by_generate():
                            yield chunk
                        return
                    if event.status_code:
                        code = STATUS_CODES.get(event.status_code, grpc.StatusCode.UNKNOWN)
                        raise ServiceError(code, event.status_message or code.name)
                    if event.outstanding_requests >= 0:
                        self.outstanding_requests = event.outstanding_requests
                    return
        finally:
            self._stream.forget(request_id, cancel=not ended)

    async def _by_generate(self) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        """The request as a Generate call of its own, for shards without GenerateMany."""
        unary = _UnaryCall(self._stream.stub, self._request, self._timeout, self._metadata)
        self._stream.unary_calls += 1
        try:
            async for chunk in unary.chunks():
                yield chunk
        finally:
            self._stream.unary_calls -= 1
        self.outstanding_requests = unary.outstanding_requests


class _UnaryCall:
    """The request as a Generate call of its own, for shards without GenerateMany."""

    def __init__(
        self,
        stub: shard_pb2_grpc.ShardStub,
        request: shard_pb2.ShardGenerateRequest,
        timeout: float | None,
        metadata: Metadata | None,
    ) -> None:
        self._stub = stub
        self._request = request
        self._timeout = timeout
        self._metadata = metadata
        self.outstanding_requests: int | None = None

    async def chunks(self) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        call = self._stub.Generate(self._request, timeout=self._timeout, metadata=self._metadata)
        try:
            async for chunk in call:
                yield chunk
            self.outstanding_requests = outstanding_requests(await call.trailing_metadata())
        except grpc.aio.AioRpcError as error:
            raise ServiceError.from_rpc_error(error) from error
        finally:
            call.cancel()


def _too_large(num_bytes: int) -> str:
    return (
        f"the request is {num_bytes} bytes as sent to a shard, over the {MAX_ACTION_BYTES} a shard "
        "accepts; send a shorter prompt (or request_id)"
    )


def _end_event(code: grpc.StatusCode, message: str) -> shard_pb2.ShardStreamEvent:
    return shard_pb2.ShardStreamEvent(end=True, status_code=code.value[0], status_message=message)


class _Inbox:
    """A request's events as the stream's reader hands them over; one waiter, woken once per batch."""

    __slots__ = ("_events", "_waiter")

    def __init__(self) -> None:
        self._events: deque[shard_pb2.ShardStreamEvent] = deque()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, event: shard_pb2.ShardStreamEvent) -> None:
        self._events.append(event)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def take(self) -> list[shard_pb2.ShardStreamEvent]:
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        events = list(self._events)
        self._events.clear()
        return events
