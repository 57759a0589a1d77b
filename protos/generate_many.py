"""The shard side of Shard/GenerateMany: many Generate requests over one long-lived stream.

A router that opened a gRPC call per request spent about as much CPU on its call to the shard as on
its client's call to it; over one stream per shard, a request costs it one message out and its chunks
in, which arrive batched (everything ready when the shard writes goes in one message). Each request
runs as its own task through the same generator that serves Generate, so the two RPCs behave alike:
same errors, same deadlines, same load report at the end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import TypeVar

import grpc

from loraplex.protos.rpc import ServiceError
from loraplex.protos.v1 import common_pb2, shard_pb2

log = logging.getLogger("loraplex.generate_many")

# (request, seconds left until its deadline or None, call metadata) -> its chunks
GenerateFn = Callable[
    [shard_pb2.ShardGenerateRequest, float | None, tuple[tuple[str, str], ...]],
    AsyncIterator[common_pb2.GenerateStreamResponse],
]
T = TypeVar("T")
# gRPC refuses a message over 4 MiB (its default, which shards keep), and a refused message ends the
# whole stream: every request on it fails. Batches stop growing at BATCH_BYTES, so requests that fit
# one message each never add up to one too large; a router refuses a request too large on its own.
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
BATCH_BYTES = 1024 * 1024
DRAINING_MESSAGE = "the shard is draining and takes no new requests; retry on another shard"


async def serve_generate_many(
    requests: AsyncIterator[shard_pb2.ShardStreamRequest],
    generate: GenerateFn,
    outstanding_requests: Callable[[], int] | None = None,
    draining: asyncio.Event | None = None,
) -> AsyncIterator[shard_pb2.ShardStreamResponse]:
    """The responses for one GenerateMany stream. Ends when the caller has closed its side and every
    request is over, or once `draining` is set and every request is over (a request started after
    that is refused with UNAVAILABLE, which routers retry elsewhere)."""
    stream = _Multiplexer(generate, outstanding_requests)
    reader = asyncio.create_task(stream.read(requests))
    watcher = asyncio.create_task(stream.drain_on(draining)) if draining is not None else None
    try:
        async for response in stream.responses():
            yield response
    finally:
        reader.cancel()
        if watcher is not None:
            watcher.cancel()
        stream.cancel_all()


async def queued_batches(
    queue: asyncio.Queue[T | None], size: Callable[[T], int], max_bytes: int = BATCH_BYTES
) -> AsyncIterator[list[T]]:
    """Everything queued by the time the writer gets to run, as one batch (one message on the stream,
    both ways) of at most max_bytes (by `size`; an item larger goes alone); ends at the None that
    closes the queue."""
    carried = None  # the item that would have made the last batch too large: the next one's first
    while (item := carried if carried is not None else await queue.get()) is not None:
        batch, num_bytes, carried = [item], size(item), None
        while carried is None and not queue.empty():
            if (item := queue.get_nowait()) is None:
                yield batch
                return
            item_bytes = size(item)
            if num_bytes + item_bytes > max_bytes:
                carried = item
            else:
                batch.append(item)
                num_bytes += item_bytes
        yield batch


class _Multiplexer:
    def __init__(self, generate: GenerateFn, outstanding_requests: Callable[[], int] | None) -> None:
        self._generate = generate
        self._outstanding_requests = outstanding_requests
        self._events: asyncio.Queue[shard_pb2.ShardStreamEvent | None] = asyncio.Queue()
        self._running: dict[int, asyncio.Task] = {}
        self._caller_done = False
        self._draining = False

    async def responses(self) -> AsyncIterator[shard_pb2.ShardStreamResponse]:
        async for events in queued_batches(self._events, shard_pb2.ShardStreamEvent.ByteSize):
            yield shard_pb2.ShardStreamResponse(events=events)

    async def read(self, requests: AsyncIterator[shard_pb2.ShardStreamRequest]) -> None:
        try:
            async for message in requests:
                for action in message.actions:
                    self._act(action)
        except grpc.RpcError:
            pass  # the caller's side broke: close as if it had ended cleanly
        self._caller_done = True
        self._close_when_idle()

    def _act(self, action: shard_pb2.ShardStreamAction) -> None:
        if action.cancel:
            task = self._running.get(action.id)
            if task is not None:
                task.cancel()
        elif self._draining:
            self._end(action.id, grpc.StatusCode.UNAVAILABLE, DRAINING_MESSAGE)
        elif action.id in self._running:
            self._end(action.id, grpc.StatusCode.INVALID_ARGUMENT, "request id already running")
        else:
            task = asyncio.create_task(self._run(action))
            self._running[action.id] = task
            task.add_done_callback(lambda _, request_id=action.id: self._finished(request_id))

    async def drain_on(self, draining: asyncio.Event) -> None:
        await draining.wait()
        self._draining = True
        self._close_when_idle()

    async def _run(self, action: shard_pb2.ShardStreamAction) -> None:
        """The request's chunks, then its end; stopped at its deadline, as gRPC stops a Generate call
        (whatever it is waiting for: an adapter's load, a place in the engine, a token)."""
        timeout = action.timeout_s if action.timeout_s > 0 else None
        code, message = grpc.StatusCode.OK, ""
        deadline = asyncio.timeout(timeout)
        try:
            async with deadline:
                generation = self._generate(action.start, timeout, tuple(action.metadata.items()))
                async with aclosing(generation) as chunks:
                    async for chunk in chunks:
                        self._events.put_nowait(shard_pb2.ShardStreamEvent(id=action.id, chunk=chunk))
        except ServiceError as error:
            code, message = error.code, error.message
        except Exception as error:
            if deadline.expired():  # the TimeoutError that asyncio.timeout raises
                code = grpc.StatusCode.DEADLINE_EXCEEDED
                message = f"the request's deadline ({timeout:g} s) passed on the shard"
            else:  # as the ErrorInterceptor does for Generate: never a bare failure
                log.exception("request %d on a GenerateMany stream failed", action.id)
                code, message = grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}"
        self._end(action.id, code, message)

    def _end(self, request_id: int, code: grpc.StatusCode, message: str) -> None:
        load = -1
        if code == grpc.StatusCode.OK and self._outstanding_requests is not None:
            load = self._outstanding_requests()
        self._events.put_nowait(
            shard_pb2.ShardStreamEvent(
                id=request_id,
                end=True,
                status_code=code.value[0],
                status_message=message,
                outstanding_requests=load,
            )
        )

    def _finished(self, request_id: int) -> None:
        del self._running[request_id]
        self._close_when_idle()

    def _close_when_idle(self) -> None:
        if (self._caller_done or self._draining) and not self._running:
            self._events.put_nowait(None)

    def cancel_all(self) -> None:
        """The stream is going away (the caller left, or the server is stopping): stop its requests,
        which aborts them in the engine and frees their KV blocks."""
        for task in list(self._running.values()):
            task.cancel()
