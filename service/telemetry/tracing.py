"""OpenTelemetry traces, configured the standard way and off unless asked for.

`OTEL_TRACES_EXPORTER=otlp` turns them on (with `OTEL_EXPORTER_OTLP_ENDPOINT`,
`OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf`, `OTEL_SERVICE_NAME`, `OTEL_TRACES_SAMPLER*`,
`OTEL_BSP_*`, read by the SDK itself); unset or `none`, no SDK is imported, no exporter is
made and a request costs one attribute check (`Tracing.enabled`).

What a trace shows: one server span per request (`POST /segment`, the gRPC method), a child
of the client's W3C `traceparent` when it sends one; under it a span per stage the request
went through (decode, preprocess, queue, inference, postprocess, encode: from the request's
`Timings`, which records intervals only while tracing is on), with model, version, variant,
request id, pixels and tiles; and one span per batch run (`batch`), with a link to every
request it served: the OTel specification's answer to work that serves many traces at once,
so that a trace shows who shared its batch (a large image's tiles: one link per tile run).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from typing import Any

from segserve.service.telemetry.clock import Timings

log = logging.getLogger("segserve")
# Timings run on time.monotonic; spans are stamped in ns since the epoch.
_OFFSET_NS = time.time_ns() - time.monotonic_ns()


def epoch_ns(monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + _OFFSET_NS


class Tracing:
    """The service's tracer, or nothing (`enabled` False)."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self.tracer, self.provider = tracer, provider
        self.enabled = tracer is not None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Tracing:
        exporter = environ.get("OTEL_TRACES_EXPORTER", "none").strip().lower()
        if exporter in ("", "none"):
            return cls()
        if exporter != "otlp":
            raise ValueError(f"OTEL_TRACES_EXPORTER={exporter}: segserve exports otlp or none")
        protocol = environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or environ.get(
            "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
        )
        if protocol != "http/protobuf":
            raise ValueError(
                f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol}: segserve exports http/protobuf"
            )
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError as exc:
            raise ValueError(
                f"OTEL_TRACES_EXPORTER=otlp needs the tracing extra ({exc}): "
                "pip install 'segserve[tracing]'"
            ) from exc
        from segserve import __version__

        name = environ.get("OTEL_SERVICE_NAME", "segserve")
        resource = Resource.create({"service.name": name, "service.version": __version__})
        provider = TracerProvider(resource=resource)  # the sampler: OTEL_TRACES_SAMPLER
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("tracing: OTLP over http/protobuf as %s", name)
        return cls(provider.get_tracer("segserve"), provider)

    def start_request(self, name: str, carrier: Mapping[str, str], timings: Timings, **attributes):
        """The request's server span, a child of the carrier's `traceparent` (W3C trace
        context), stamped at the request's arrival; its stages are recorded from now on."""
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind

        span = self.tracer.start_span(
            name,
            context=extract(dict(carrier)),
            kind=SpanKind.SERVER,
            start_time=epoch_ns(timings.arrived),
            attributes={k: v for k, v in attributes.items() if v is not None},
        )
        timings.spans = []
        timings.trace = span
        return span

    def end_request(self, span, timings: Timings, **attributes) -> None:
        """The stage spans under the request's, then the request's own end."""
        from opentelemetry import trace

        parent = trace.set_span_in_context(span)
        common = {k: v for k, v in attributes.items() if v not in (None, "")}
        span.set_attributes(common)
        for stage, start, end, extra in timings.spans or ():
            child = self.tracer.start_span(
                stage, context=parent, start_time=epoch_ns(start), attributes={**common, **extra}
            )
            child.end(end_time=epoch_ns(end))
        span.end()

    def batch(self, run, model: str, version: int, variant: str) -> None:
        """One span for a batch run, linked to the span of every request it served."""
        from opentelemetry.trace import Link

        links, seen = [], set()
        for timings in run.contexts():
            span = getattr(timings, "trace", None)
            if span is not None and id(span) not in seen:
                seen.add(id(span))
                links.append(Link(span.get_span_context()))
        if not links:
            return  # no traced request in it
        attributes = {
            "segserve.model": model,
            "segserve.version": version,
            "segserve.variant": variant,
            "segserve.batch.size": len(run.jobs),
            "segserve.batch.pixels": run.pixels,
            "segserve.batch.failed": run.failed,
        }
        span = self.tracer.start_span(
            "batch", links=links, start_time=epoch_ns(run.started), attributes=attributes
        )
        span.end(end_time=epoch_ns(run.started + run.run_s))

    def trace_id(self, span) -> str:
        return format(span.get_span_context().trace_id, "032x")

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes what the batch processor holds
