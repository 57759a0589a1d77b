"""The gateway's side of the router: one gRPC channel, and generation streams whose errors surface
before the HTTP response starts, so a bad request gets its 4xx status instead of a broken stream."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace

from loraplex.protos.rpc import client_options
from loraplex.protos.telemetry import metadata_for
from loraplex.protos.v1 import (
    adapters_pb2,
    adapters_pb2_grpc,
    common_pb2,
    generation_pb2_grpc,
    jobs_pb2,
    jobs_pb2_grpc,
)
from loraplex.router.gateway.errors import APIError

Chunk = common_pb2.GenerateStreamResponse

# Admin and job calls: longer than the router's own Redis timeouts (10 s for the job queue), so a
# Redis that stopped answering reaches the caller as the router's 503 naming it, not a bare 504.
UNARY_TIMEOUT_S = 15.0


class RouterClient:
    def __init__(self, address: str, timeout_s: float) -> None:
        self.address = address
        self.timeout_s = timeout_s

    def open(self) -> None:
        """Create the channel; called on the serving event loop, which a grpc.aio channel is bound to."""
        self._channel = grpc.aio.insecure_channel(self.address, options=client_options())
        self._generation = generation_pb2_grpc.GenerationStub(self._channel)
        self._adapters = adapters_pb2_grpc.AdaptersStub(self._channel)
        self._jobs = jobs_pb2_grpc.JobsStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def open_stream(self, request: common_pb2.GenerateRequest) -> AsyncIterator[Chunk]:
        """Start a generation and wait for its first chunk; errors before it raise APIError here."""
        call = self._generation.GenerateStream(
            request, timeout=self.timeout_s, metadata=metadata_for(trace.get_current_span())
        )
        try:
            first = await call.read()
        except grpc.aio.AioRpcError as error:
            raise self._error(error, generation=True) from error
        except BaseException:
            call.cancel()
            raise
        if first is grpc.aio.EOF:
            call.cancel()
            raise APIError(502, "the router closed the stream without a response; retry the request")
        return self._rest_of(call, first)

    async def open_streams(
        self, requests: Sequence[common_pb2.GenerateRequest]
    ) -> list[AsyncIterator[Chunk]]:
        """Open several generations at once (OpenAI's `n`, or a batch of prompts); all or none."""
        tasks = [asyncio.ensure_future(self.open_stream(request)) for request in requests]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):
                    stream = await task
                    await stream.aclose()  # type: ignore[attr-defined]
            raise

    async def list_adapters(self) -> list[common_pb2.Adapter]:
        try:
            response = await self._adapters.List(
                adapters_pb2.ListAdaptersRequest(),
                timeout=UNARY_TIMEOUT_S,
                metadata=metadata_for(trace.get_current_span()),
            )
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
        return list(response.adapters)

    async def submit_job(self, request: common_pb2.GenerateRequest, callback_url: str = "") -> str:
        try:
            response = await self._jobs.Submit(
                jobs_pb2.SubmitJobRequest(request=request, callback_url=callback_url),
                timeout=UNARY_TIMEOUT_S,
                metadata=metadata_for(trace.get_current_span()),
            )
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error
        return response.job_id

    async def get_job(self, job_id: str) -> jobs_pb2.Job:
        try:
            return await self._jobs.Get(
                jobs_pb2.GetJobRequest(job_id=job_id),
                timeout=UNARY_TIMEOUT_S,
                metadata=metadata_for(trace.get_current_span()),
            )
        except grpc.aio.AioRpcError as error:
            raise self._error(error) from error

    async def serving(self) -> bool:
        try:
            response = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return response.status == health_pb2.HealthCheckResponse.SERVING

    async def _rest_of(self, call, first: Chunk) -> AsyncIterator[Chunk]:
        """The stream from its first chunk on; closing it early (a client that left) cancels the call."""
        try:
            yield first
            while True:
                try:
                    chunk = await call.read()
                except grpc.aio.AioRpcError as error:
                    raise self._error(error, generation=True) from error
                if chunk is grpc.aio.EOF:
                    return
                yield chunk
        finally:
            call.cancel()

    def _error(self, error: grpc.aio.AioRpcError, generation: bool = False) -> APIError:
        """The router's answer as its status says. A router that could not be reached or went away
        mid-call, and the gateway's own deadline, are said in an HTTP caller's words rather than
        gRPC's ("failed to connect to all addresses", "Socket closed", "Deadline Exceeded")."""
        api_error = APIError.from_rpc_error(error)
        code, details = error.code(), error.details() or error.code().name
        connected = self._channel.get_state() == grpc.ChannelConnectivity.READY
        if code == grpc.StatusCode.UNAVAILABLE and not connected:
            api_error.message = (
                f"the router at {self.address} is unreachable or went away ({details}); retry shortly"
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED and generation:
            api_error.message = (
                f"the generation did not finish within the gateway's request timeout ({self.timeout_s:g} s, "
                "--request-timeout); ask for fewer tokens, or retry when the mesh is less busy"
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            api_error.message = f"the router did not answer within {UNARY_TIMEOUT_S:g} s; retry later"
        return api_error


async def merge_streams(streams: Sequence[AsyncIterator[Chunk]]) -> AsyncIterator[tuple[int, Chunk]]:
    """Interleave several streams as chunks arrive, tagged with their index; the first error stops all.
    Each stream is read about as fast as the merged one is, so a slow client holds back the router
    (gRPC flow control) instead of the gateway buffering whole generations for it."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue = asyncio.Queue(maxsize=len(streams))
    done = object()

    async def pump(index: int, stream: AsyncIterator[Chunk]) -> None:
        try:
            async for chunk in stream:
                await queue.put((index, chunk))
            await queue.put((index, done))
        except Exception as error:
            await queue.put((index, error))

    tasks = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            with contextlib.suppress(BaseException):
                await stream.aclose()  # type: ignore[attr-defined]
