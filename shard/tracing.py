"""One shard request's spans. The request span opens when the call arrives; its phases are recorded
as children when it ends, from timestamps: the service's own (adapter load, submit) and the engine
thread's (`SequenceTimes`, handed back with the last output), so the engine never touches OpenTelemetry.

    shard.generate
    ├── shard.adapter_load   the tiers' part: tier = gpu | cpu | disk | source
    ├── shard.queue_wait     submitted to the engine -> first scheduled
    ├── shard.prefill        first scheduled -> first token
    └── shard.decode         first token -> finished

The request span carries the gRPC status the caller got (`rpc.grpc.status_code`), and is marked
failed on an error or a deadline that passed; a caller that left (CANCELLED) is no failure of ours.
"""

from __future__ import annotations

import time

import grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from loraplex.protos import telemetry
from loraplex.protos.rpc import ServiceError
from loraplex.protos.telemetry import Metadata
from loraplex.shard.engine import EngineOutput
from loraplex.shard.lora import LoraAdapter
from loraplex.shard.outputs import TokenOutput


class RequestSpans:
    def __init__(
        self,
        tracer: trace.Tracer,
        metadata: Metadata | None,
        shard_id: str,
        time_remaining: float | None = None,
    ) -> None:
        self.span = tracer.start_span(
            "shard.generate", context=telemetry.context_from_metadata(metadata), kind=SpanKind.SERVER
        )
        self._tracer = tracer
        self._shard_id = shard_id
        self._deadline = None if time_remaining is None else time.monotonic() + time_remaining
        self._adapter: tuple[LoraAdapter, str, int, int] | None = None  # adapter, tier, start, end
        self._submitted_ns = 0
        self._last: EngineOutput | None = None

    def adapter_acquired(self, adapter: LoraAdapter, tier: str, started_ns: int) -> None:
        """The adapter came from `tier` ("cpu", "disk" or "source") after waiting since started_ns."""
        self._adapter = (adapter, tier, started_ns, time.time_ns())

    def submitted(self) -> None:
        self._submitted_ns = time.time_ns()

    def finished(self, output: EngineOutput) -> None:
        """The engine's last output for the request: it carries the engine thread's timestamps."""
        self._last = output

    def end(self, error: Exception | None = None) -> None:
        """End the request span, with its phases as children when it records (no work otherwise).
        A request that ends with neither its last output nor an error was stopped: by its deadline,
        or by its caller leaving."""
        span = self.span
        if span.is_recording():
            span.set_attributes(self._attributes())
            self._record_phases()
            code = self._status_code(error)
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if error is not None:
                telemetry.set_error(span, getattr(error, "message", None) or str(error), error)
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                telemetry.set_error(span, "the request's deadline passed on the shard")
        span.end()

    def _status_code(self, error: Exception | None) -> grpc.StatusCode:
        if error is not None:
            return error.code if isinstance(error, ServiceError) else grpc.StatusCode.INTERNAL
        if self._last is not None:
            return grpc.StatusCode.OK
        if self._deadline is not None and telemetry.stopped_by_deadline(self._deadline - time.monotonic()):
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _attributes(self) -> dict:
        attributes: dict = {telemetry.SHARD: self._shard_id}
        if self._adapter is not None:
            adapter = self._adapter[0]
            attributes[telemetry.ADAPTER] = adapter.name
            attributes[telemetry.ADAPTER_VERSION] = adapter.version
            attributes[telemetry.ADAPTER_TIER] = self._tier()
        if isinstance(self._last, TokenOutput):
            attributes[telemetry.PROMPT_TOKENS] = self._last.num_prompt_tokens
            attributes[telemetry.COMPLETION_TOKENS] = self._last.num_generated
            attributes[telemetry.FINISH_REASONS] = [self._last.finish_reason or ""]
        return attributes

    def _tier(self) -> str:
        """The fastest tier that had the adapter: an adapter in memory whose first admission found it
        in a slot came from the GPU tier."""
        assert self._adapter is not None
        tier = self._adapter[1]
        times = self._last.times if self._last is not None else None
        return "gpu" if tier == "cpu" and times is not None and times.slot_hit else tier

    def _record_phases(self) -> None:
        parent, tracer = self.span, self._tracer
        if self._adapter is not None:
            adapter, _, started_ns, ended_ns = self._adapter
            attributes = {telemetry.ADAPTER: adapter.name, telemetry.ADAPTER_TIER: self._tier()}
            telemetry.record_span(tracer, "shard.adapter_load", parent, started_ns, ended_ns, attributes)
        times = self._last.times if self._last is not None else None
        if times is None or not self._submitted_ns:
            return
        scheduled, first_token, finished = times.scheduled_ns, times.first_token_ns, times.finished_ns
        telemetry.record_span(tracer, "shard.queue_wait", parent, self._submitted_ns, scheduled or finished)
        if scheduled:
            telemetry.record_span(tracer, "shard.prefill", parent, scheduled, first_token or finished)
        if first_token:
            telemetry.record_span(tracer, "shard.decode", parent, first_token, finished)
