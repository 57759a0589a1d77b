"""The Shard gRPC service: converts protobuf to engine inputs and engine outputs to protobuf.
Protobuf stays here; the engine sees plain Python values."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from opentelemetry import trace

from loraplex.protos.generate_many import DRAINING_MESSAGE, serve_generate_many
from loraplex.protos.load_report import load_metadata
from loraplex.protos.rpc import ServiceError
from loraplex.protos.telemetry import Metadata
from loraplex.protos.v1 import common_pb2, shard_pb2, shard_pb2_grpc
from loraplex.registry.adapter_config import InvalidAdapter
from loraplex.shard.adapter_store import AdapterStore
from loraplex.shard.engine import Engine, EngineOutput, EngineRequest, EngineStats
from loraplex.shard.lora import IncompatibleAdapter, LoraAdapter
from loraplex.shard.metrics import ShardMetrics
from loraplex.shard.outputs import RequestFailed, TokenOutput
from loraplex.shard.prompts import PromptEncoder
from loraplex.shard.request_inputs import check_inputs
from loraplex.shard.sampling import SamplingParams
from loraplex.shard.sampling_limits import sampling_fields
from loraplex.shard.tracing import RequestSpans

FAILURE_CODES = {  # RequestFailed.reason -> status; anything else is INTERNAL
    "deadline": grpc.StatusCode.DEADLINE_EXCEEDED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,  # the router retries it on another shard
}
TIERS = {"gpu": common_pb2.TIER_GPU, "cpu": common_pb2.TIER_CPU, "disk": common_pb2.TIER_DISK}
# A request larger than this is parsed (tokenized, its chat rendered) on a worker thread: tokenizing
# takes about 0.6 us a character, and a prompt of megabytes parsed on the event loop held every other
# request's chunks for seconds. The tokenizer lets go of the GIL; smaller requests cost less inline.
INLINE_PARSE_BYTES = 16 * 1024
FINISH_REASONS = {
    "length": common_pb2.FINISH_REASON_LENGTH,
    "stop": common_pb2.FINISH_REASON_STOP,
    "eos": common_pb2.FINISH_REASON_EOS,
}


class ShardService(shard_pb2_grpc.ShardServicer):
    def __init__(
        self,
        engine: Engine,
        adapters: AdapterStore,
        shard_id: str,
        address: str,
        base_model: str,
        metrics: ShardMetrics | None = None,
    ) -> None:
        self._engine = engine
        self._metrics = metrics
        self._prompts: PromptEncoder = engine.prompts
        self.adapters = adapters
        self.shard_id = shard_id
        self.address = address
        self.base_model = base_model
        self._tracer = trace.get_tracer("loraplex.shard")
        self._awaiting_adapters = 0  # calls waiting for their adapter's load, not yet in the engine
        self.draining = asyncio.Event()  # set when the shard stops: it takes no new requests

    async def Generate(
        self, request: shard_pb2.ShardGenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        if self.draining.is_set():  # the port stays open while the shard drains, for health checks
            raise ServiceError.unavailable(DRAINING_MESSAGE)
        generation = self._serve(request, context.time_remaining(), context.invocation_metadata())
        async with aclosing(generation) as chunks:
            async for chunk in chunks:
                yield chunk
        context.set_trailing_metadata(load_metadata(self.outstanding_requests()))

    async def GenerateMany(
        self, requests: AsyncIterator[shard_pb2.ShardStreamRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[shard_pb2.ShardStreamResponse]:
        streams = serve_generate_many(requests, self._serve, self.outstanding_requests, self.draining)
        async with aclosing(streams) as responses:
            async for response in responses:
                yield response

    async def _serve(
        self,
        request: shard_pb2.ShardGenerateRequest,
        time_remaining: float | None,
        metadata: Metadata | None,
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        """One request's chunks, for Generate and GenerateMany alike."""
        inner = request.request
        timer = self._metrics.request(request.adapter.name) if self._metrics else None
        spans = RequestSpans(self._tracer, metadata, self.shard_id, time_remaining)
        outcome = "cancelled"  # unless it finishes or fails: the caller left or its deadline passed
        adapter = failure = None
        try:
            if inner.adapter and inner.adapter != request.adapter.name:
                raise ServiceError.invalid(
                    f"request names adapter {inner.adapter!r} without its catalogue record; "
                    "send it through the router"
                )
            if inner.ByteSize() <= INLINE_PARSE_BYTES:
                prompt_ids, params = self._parse(inner)
            else:
                prompt_ids, params = await asyncio.to_thread(self._parse, inner)
            if request.adapter.name:
                started_ns = time.time_ns()
                self._awaiting_adapters += 1
                self._count_awaiting_adapters()
                try:
                    adapter, tier = await self._adapter(request.adapter)
                finally:
                    self._awaiting_adapters -= 1
                    self._count_awaiting_adapters()
                spans.adapter_acquired(adapter, tier, started_ns)
            generation = self._generate(inner, prompt_ids, params, adapter, time_remaining, spans)
            async with aclosing(generation) as chunks:
                async for chunk in chunks:
                    if timer is not None:
                        timer.token()
                    yield chunk
            outcome = "ok"
        except Exception as error:
            outcome, failure = "error", error
            raise
        finally:
            if adapter is not None:
                self.adapters.release(adapter)
            if timer is not None:
                timer.done(outcome)
            spans.end(failure)

    async def _generate(
        self,
        inner: common_pb2.GenerateRequest,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: LoraAdapter | None,
        remaining: float | None,
        spans: RequestSpans,
    ) -> AsyncIterator[common_pb2.GenerateStreamResponse]:
        request_id = inner.request_id or uuid.uuid4().hex
        with_tokens = inner.details or inner.parameters.logprobs or params.top_logprobs > 0
        engine_request = EngineRequest(
            request_id=uuid.uuid4().hex,  # the client's id need not be unique; the engine's must
            prompt_ids=prompt_ids,
            params=params,
            adapter=adapter,
            want_prompt_logprobs=inner.decoder_input_details,
            deadline=None if remaining is None else time.monotonic() + remaining,
        )
        async with aclosing(self._outputs(engine_request, spans)) as outputs:
            async for output in outputs:
                if isinstance(output, RequestFailed):
                    raise ServiceError(
                        FAILURE_CODES.get(output.reason, grpc.StatusCode.INTERNAL), output.message
                    )
                yield self._chunk(output, request_id, with_tokens, prompt_ids, adapter)

    async def _outputs(self, request: EngineRequest, spans: RequestSpans) -> AsyncIterator[EngineOutput]:
        """The request's outputs as the engine thread produces them; leaving early (the client went
        away, or its deadline passed) aborts the request and frees its KV blocks."""
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[EngineOutput] = asyncio.Queue()
        spans.submitted()
        self._engine.submit(request, lambda output: loop.call_soon_threadsafe(outputs.put_nowait, output))
        finished = False
        try:
            while not finished:
                output = await outputs.get()
                finished = isinstance(output, RequestFailed) or output.finish_reason is not None
                if finished:
                    spans.finished(output)
                yield output
        finally:
            if not finished:
                self._engine.abort(request.request_id)

    def _parse(self, request: common_pb2.GenerateRequest) -> tuple[list[int], SamplingParams]:
        try:
            check_inputs(request)
            if request.prompt:
                prompt_ids = self._prompts.encode_text(request.prompt, request.apply_chat_template)
            elif request.messages:
                prompt_ids = self._prompts.encode_chat([(m.role, m.content) for m in request.messages])
            else:
                prompt_ids = list(request.prompt_token_ids)
                self._prompts.check_token_ids(prompt_ids)
            if not prompt_ids:
                raise ValueError("the prompt encodes to zero tokens; send some text")
            return prompt_ids, _sampling_params(request.parameters, len(prompt_ids), self._prompts)
        except ValueError as error:
            raise ServiceError.invalid(str(error)) from error

    async def _adapter(self, record: common_pb2.Adapter) -> tuple[LoraAdapter, str]:
        """The adapter at the record's version, from the fastest tier holding it, and that tier;
        release it after use."""
        try:
            return await self.adapters.acquire_with_tier(
                record.source, record.name, record.version, record.checksum
            )
        except InvalidAdapter as error:
            raise ServiceError.invalid(f"adapter {record.name!r}: {error}") from error
        except IncompatibleAdapter as error:
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION, f"adapter {record.name!r}: {error}"
            ) from error

    def _chunk(
        self,
        output: TokenOutput,
        request_id: str,
        with_tokens: bool,
        prompt_ids: list[int],
        adapter: LoraAdapter | None,
    ) -> common_pb2.GenerateStreamResponse:
        chunk = common_pb2.GenerateStreamResponse(request_id=request_id, text=output.text)
        if with_tokens:
            chunk.tokens.append(self._token(output.token.token_id, output.token.logprob, output.token.top))
        if output.prompt_logprobs:
            for token_id, logprob in zip(prompt_ids, output.prompt_logprobs, strict=True):
                chunk.prefill_tokens.append(
                    self._token(token_id, float("nan") if logprob is None else logprob, ())
                )
        if output.finish_reason:
            chunk.finish_reason = FINISH_REASONS[output.finish_reason]
            chunk.stop_text = output.stop_text
            chunk.usage.CopyFrom(
                common_pb2.Usage(
                    prompt_tokens=output.num_prompt_tokens,
                    completion_tokens=output.num_generated,
                    total_tokens=output.num_prompt_tokens + output.num_generated,
                )
            )
            chunk.served_by.CopyFrom(
                common_pb2.ServedBy(
                    shard=self.shard_id,
                    adapter=adapter.name if adapter else "",
                    adapter_version=adapter.version if adapter else 0,
                )
            )
        return chunk

    def _token(self, token_id: int, logprob: float, top: tuple[tuple[int, float], ...]) -> common_pb2.Token:
        return common_pb2.Token(
            id=token_id,
            text=self._prompts.token_text(token_id),
            logprob=logprob,
            special=self._prompts.is_special(token_id),
            top_logprobs=[
                common_pb2.TopLogprob(
                    id=i, text=self._prompts.token_text(i), logprob=lp, special=self._prompts.is_special(i)
                )
                for i, lp in top
            ],
        )

    async def LoadAdapter(
        self, request: shard_pb2.LoadAdapterRequest, context
    ) -> shard_pb2.LoadAdapterResponse:
        if not request.adapter.name or not request.adapter.source:
            raise ServiceError.invalid("`adapter` needs at least a name and a source")
        started = time.perf_counter()
        adapter = (await self._adapter(request.adapter))[0]
        self.adapters.release(adapter)
        load_ms = (time.perf_counter() - started) * 1000
        return shard_pb2.LoadAdapterResponse(
            tier=self._tier_of((adapter.name, adapter.version)), load_ms=load_ms
        )

    async def UnloadAdapter(
        self, request: shard_pb2.UnloadAdapterRequest, context
    ) -> shard_pb2.UnloadAdapterResponse:
        loading = self.adapters.is_loading(request.name, request.version)
        # a load under way is not kept (its waiters are still served): that unloads it too
        if not self.adapters.drop(request.name, request.version) and not loading:
            raise ServiceError.not_found(
                f"adapter {request.name!r} (version {request.version or 'any'}) is not loaded"
            )
        return shard_pb2.UnloadAdapterResponse()

    def _tier_of(self, key: tuple[str, int]) -> int:
        """The fastest tier holding a just-loaded adapter: host memory, a GPU slot if requests use it,
        only the disk cache if the CPU tier let it go at once (all else in use), or none."""
        tiers = {(name, version): tier for name, version, tier in self.held_adapters()}
        return TIERS[tiers[key]] if key in tiers else common_pb2.TIER_UNSPECIFIED

    async def Status(self, request: shard_pb2.ShardStatusRequest, context) -> shard_pb2.ShardStatus:
        stats = self._engine.stats
        return shard_pb2.ShardStatus(
            shard_id=self.shard_id,
            address=self.address,
            base_model=self.base_model,
            max_context=self._engine.max_context,
            running_requests=stats.running_requests,
            waiting_requests=self.waiting_requests(stats),
            queued_tokens=stats.queued_tokens,
            max_running_requests=self._engine.scheduler.max_running_requests,
            kv_blocks_used=stats.kv_blocks_used,
            kv_blocks_free=stats.kv_blocks_free,
            max_gpu_adapters=self._engine.slots.num_slots,
            max_cpu_adapters=self.adapters.max_cpu_adapters,
            adapters=[
                common_pb2.AdapterPlacement(adapter=name, version=version, tier=TIERS[tier])
                for name, version, tier in self.held_adapters()
            ],
        )

    def _count_awaiting_adapters(self) -> None:
        if self._metrics is not None:
            self._metrics.awaiting_adapter_load.set(self._awaiting_adapters)

    def outstanding_requests(self) -> int:
        """The load report sent as each request ends. The engine's stats were published before the
        request's last chunk, so the request itself is not in it."""
        stats = self._engine.stats
        return stats.running_requests + self.waiting_requests(stats)

    def waiting_requests(self, stats: EngineStats) -> int:
        """The engine's waiting requests and the calls still waiting for their adapter to load: both
        are work this shard has taken on, which routers must see in its load (a burst of requests for
        cold adapters would otherwise look like an idle shard until the loads finish)."""
        return stats.waiting_requests + self._awaiting_adapters

    def held_adapters(self) -> list[tuple[str, int, str]]:
        """(name, version, fastest tier) of every adapter this shard holds."""
        held: dict[tuple[str, int], str] = {}
        for key in self.adapters.disk.held() if self.adapters.disk else ():
            held[key] = "disk"
        for key in self.adapters.held():
            held[key] = "cpu"
        for key in self._engine.stats.adapters_in_slots:
            held[key] = "gpu"
        return [(name, version, tier) for (name, version), tier in held.items()]


def _sampling_params(
    parameters: common_pb2.SamplingParameters, num_prompt_tokens: int, prompts: PromptEncoder
) -> SamplingParams:
    requested = parameters.max_new_tokens if parameters.HasField("max_new_tokens") else None
    return SamplingParams(
        max_new_tokens=prompts.resolve_max_new_tokens(num_prompt_tokens, requested),
        **sampling_fields(parameters),
    )
