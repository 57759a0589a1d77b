"""Tracing shared by every process: the OpenTelemetry set-up each runs at start, and W3C trace context
(`traceparent`) carried in gRPC metadata, so one request is one trace from the gateway through the
router to a shard. An async job's run is a trace of its own, linked to the request that submitted it.

Off by default. Unless OTEL_TRACES_EXPORTER names an exporter, the API's no-op provider stays: every
span is a non-recording stub (about a microsecond to start and end), the SDK is never imported, and
callers build attributes only for a span that `is_recording()`. The exporter and everything about it
come from the standard OTEL_* variables, read here and by the SDK only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from importlib.metadata import entry_points

import grpc
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from loraplex.protos.rpc import ServiceError

log = logging.getLogger("loraplex.telemetry")

EXPORTER_ENTRY_POINTS = "opentelemetry_traces_exporter"  # where exporter packages register by name
# As the Python SDK reads them: "otlp" is OTLP over gRPC unless the protocol variable says otherwise.
OTLP_BY_PROTOCOL = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}

# Span attributes: ours under loraplex.*, token counts and finish reason in OpenTelemetry's GenAI terms.
ADAPTER = "loraplex.adapter.name"
ADAPTER_VERSION = "loraplex.adapter.version"
ADAPTER_TIER = "loraplex.adapter.tier"  # where the adapter came from: gpu, cpu, disk or source
SHARD = "loraplex.shard.id"
JOB_ID = "loraplex.job.id"
JOB_ATTEMPT = "loraplex.job.attempt"  # the job's deliveries so far, this one included
PROMPT_TOKENS = "gen_ai.usage.input_tokens"
COMPLETION_TOKENS = "gen_ai.usage.output_tokens"
FINISH_REASONS = "gen_ai.response.finish_reasons"

Metadata = Sequence[tuple[str, str]]
# A call stopped with this little of its deadline left was stopped by the deadline: a caller cancels
# at the same deadline, and its cancel may overtake the server's own timer by a few milliseconds.
DEADLINE_SLACK_S = 0.05


def configure_tracing(service_name: str, instance_id: str = "") -> bool:
    """Install an SDK tracer provider exporting (batched) to each exporter OTEL_TRACES_EXPORTER names
    (`otlp`, `console`, or any installed exporter's entry-point name); True when tracing is on.

    Unset or `none` (the default) leaves the no-op provider. A process that already has a provider
    keeps it (one process may run several components, as tests do). OTEL_SERVICE_NAME, when set, wins
    over service_name. An exporter name that nothing installed provides raises, at start.
    """
    names = exporter_names(os.environ.get("OTEL_TRACES_EXPORTER", ""))
    if not names or os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        return True
    from opentelemetry.sdk.resources import SERVICE_INSTANCE_ID, SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporters = [_exporter_class(name) for name in names]
    resource = Resource.create()  # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES
    ours = {}
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        ours[SERVICE_NAME] = service_name
    if instance_id and SERVICE_INSTANCE_ID not in resource.attributes:
        ours[SERVICE_INSTANCE_ID] = instance_id
    provider = TracerProvider(resource=resource.merge(Resource(ours)))  # OTEL_TRACES_SAMPLER too
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter()))  # OTEL_BSP_* and the exporter's own
    trace.set_tracer_provider(provider)
    log.info("tracing on: %s exporting to %s", provider.resource.attributes[SERVICE_NAME], ", ".join(names))
    return True


def exporter_names(value: str) -> list[str]:
    """OTEL_TRACES_EXPORTER's comma-separated names as entry-point names ([] for unset or `none`)."""
    names = [name.strip() for name in value.split(",") if name.strip() and name.strip() != "none"]
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if "otlp" in names and protocol not in OTLP_BY_PROTOCOL:
        raise ValueError(f"OTLP protocol {protocol!r} is not one of {', '.join(OTLP_BY_PROTOCOL)}")
    return [OTLP_BY_PROTOCOL[protocol] if name == "otlp" else name for name in names]


def _exporter_class(name: str) -> type:
    found = entry_points(group=EXPORTER_ENTRY_POINTS, name=name)
    if not found:
        installed = sorted(ep.name for ep in entry_points(group=EXPORTER_ENTRY_POINTS))
        raise ValueError(
            f"OTEL_TRACES_EXPORTER names {name!r}, which no installed package provides (installed: "
            f"{', '.join(installed) or 'none'}); install its exporter package, or unset it to trace nothing"
        )
    return next(iter(found)).load()


class _MetadataGetter(Getter[Metadata]):
    """Reads gRPC metadata: (key, value) pairs, keys lower-case."""

    def get(self, carrier: Metadata, key: str) -> list[str] | None:
        return [value for name, value in carrier if name == key] or None

    def keys(self, carrier: Metadata) -> list[str]:
        return [name for name, _ in carrier]


_METADATA = _MetadataGetter()


def context_from_metadata(metadata: Metadata | None) -> Context | None:
    """The caller's trace context from incoming gRPC metadata; None when it sent none (the usual
    untraced call, told apart with one pass over the keys instead of a parse)."""
    if not metadata:
        return None
    fields = _fields(propagate.get_global_textmap())
    if fields.isdisjoint(dict(metadata)):
        return None
    return propagate.extract(metadata, getter=_METADATA)


@lru_cache(maxsize=4)
def _fields(propagator: TextMapPropagator) -> frozenset[str]:
    """The keys a propagator reads (a composite one builds the set anew on every call)."""
    return frozenset(propagator.fields)


def links_from_metadata(metadata: Metadata | None) -> list[Link]:
    """A link to the span that sent metadata, for a span that starts a trace of its own because of it
    (a queued job's run, which may come much later and more than once); [] when it sent no trace."""
    context = context_from_metadata(metadata)
    if context is None:
        return []
    sender = trace.get_current_span(context).get_span_context()
    return [Link(sender)] if sender.is_valid else []


def metadata_for(span: Span) -> tuple[tuple[str, str], ...] | None:
    """gRPC metadata that makes span the callee's parent; None when span belongs to no trace (tracing
    off and none came in), so an untraced call sends just what it sent before."""
    if not span.get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def start_child(tracer: trace.Tracer, name: str, parent: Span, **options) -> Span:
    """A child of parent, which stays as it was rather than becoming current (a gRPC stream handler is
    an async generator, which cannot safely attach and detach the current context). A parent that
    records nothing (tracing off, or not sampled) stands in for its child, which would record nothing
    either: that costs nothing, and a trace passing through still reaches the next hop."""
    if not parent.is_recording():
        return parent
    return tracer.start_span(name, context=trace.set_span_in_context(parent), **options)


def record_span(
    tracer: trace.Tracer, name: str, parent: Span, start_ns: int, end_ns: int, attributes: dict | None = None
) -> None:
    """A finished child of parent over [start_ns, end_ns] (time.time_ns()): a phase timed elsewhere,
    such as on the engine thread, which never touches OpenTelemetry itself."""
    span = tracer.start_span(
        name, context=trace.set_span_in_context(parent), start_time=start_ns, attributes=attributes
    )
    span.end(end_time=max(start_ns, end_ns))


def stopped_by_deadline(seconds_left: float | None) -> bool:
    """Whether a call stopped (cancelled) with seconds_left of its deadline (None: it had none) was
    stopped by that deadline rather than by its caller leaving."""
    return seconds_left is not None and seconds_left <= DEADLINE_SLACK_S


def set_error(span: Span, message: str, error: BaseException | None = None) -> None:
    """Mark span failed, with the message a caller saw (and the exception as an event)."""
    if not span.is_recording():
        return
    if error is not None:
        span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, message))


@contextmanager
def server_span(tracer: trace.Tracer, name: str, context: grpc.aio.ServicerContext) -> Iterator[Span]:
    """A unary call's SERVER span, continuing the caller's trace, ended with the call's gRPC status
    (`rpc.grpc.status_code`) and failed for anything but OK and CANCELLED (the caller left); a call gRPC
    stopped at its deadline is DEADLINE_EXCEEDED, a failure."""
    span = tracer.start_span(
        name, context=context_from_metadata(context.invocation_metadata()), kind=SpanKind.SERVER
    )
    code = grpc.StatusCode.CANCELLED  # unless it ends otherwise
    try:
        yield span
        code = grpc.StatusCode.OK
    except ServiceError as error:
        code = error.code
        set_error(span, error.message)
        raise
    except Exception as error:
        code = grpc.StatusCode.INTERNAL
        set_error(span, str(error), error)
        raise
    except BaseException:  # cancelled: the caller left, or gRPC ended the call at its deadline
        if stopped_by_deadline(context.time_remaining()):
            code = grpc.StatusCode.DEADLINE_EXCEEDED
            set_error(span, "the caller's deadline passed")
        raise
    finally:
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.end()
