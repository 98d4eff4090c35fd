"""OpenTelemetry for a service: tracer and meter providers with service resources, the
server span of each call (started by the runtime's interceptor) and the client
interceptors, OTLP export when an endpoint is configured through the standard OTEL_*
variables, and a Prometheus scrape endpoint when a port is set."""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import metrics, propagate, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

log = logging.getLogger("accessline.telemetry")

SERVICE_NAMESPACE = "accessline"


def _otlp_configured(signal: str) -> bool:
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or os.environ.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    )


@dataclass
class Telemetry:
    """The providers of this process and what must be stopped with it."""

    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    prometheus_server: Any | None = None

    def tracer(self, name: str) -> trace.Tracer:
        return self.tracer_provider.get_tracer(name)

    def meter(self, name: str) -> metrics.Meter:
        return self.meter_provider.get_meter(name)

    def shutdown(self) -> None:
        """Flushes queued spans and metrics; call last on the way out."""
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()
        if self.prometheus_server is not None:
            self.prometheus_server.shutdown()


_process_telemetry: Telemetry | None = None


def setup_telemetry(
    service: str,
    version: str,
    *,
    metrics_host: str = "127.0.0.1",
    metrics_port: int = 0,
    sample_ratio: float = 1.0,
) -> Telemetry:
    """Creates this process's providers and installs them globally (once per process).
    Traces are sampled parent-based: a caller's sampled trace is always continued, and
    `sample_ratio` of the traces that start here are recorded (OTEL_TRACES_SAMPLER, when
    set, decides instead)."""
    global _process_telemetry
    if _process_telemetry is not None:
        return _process_telemetry

    attributes: dict[str, str] = {
        "service.namespace": SERVICE_NAMESPACE,
        "service.version": version,
        "service.instance.id": str(uuid.uuid4()),
    }
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = f"{SERVICE_NAMESPACE}-{service}"
    resource = Resource.create(attributes)

    sampler = (
        None
        if os.environ.get("OTEL_TRACES_SAMPLER")
        else ParentBased(TraceIdRatioBased(sample_ratio))
    )
    tracer_provider = TracerProvider(resource=resource, sampler=sampler)
    if _otlp_configured("TRACES"):
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))

    readers: list[MetricReader] = []
    if _otlp_configured("METRICS"):
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    prometheus_server = None
    if metrics_port:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        readers.append(PrometheusMetricReader())
        prometheus_server, _ = start_http_server(metrics_port, addr=metrics_host)
    meter_provider = MeterProvider(resource=resource, metric_readers=readers)

    trace.set_tracer_provider(tracer_provider)
    metrics.set_meter_provider(meter_provider)
    _process_telemetry = Telemetry(tracer_provider, meter_provider, prometheus_server)
    return _process_telemetry


def context_from(traceparent: str, tracestate: str = "") -> Any:
    """An OpenTelemetry context carrying a stored W3C trace context (for work that
    continues a trace across etcd, such as an offer answered by an agent)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


def span_context_from(traceparent: str, tracestate: str = "") -> trace.SpanContext | None:
    """The span context of a stored W3C trace context, for a span link; None if invalid."""
    if not traceparent:
        return None
    found = trace.get_current_span(context_from(traceparent, tracestate)).get_span_context()
    return found if found.is_valid else None


# Resolved once (a proxy until the provider is set, then that provider's tracer): asking
# the provider at every call built a tracer each time, 3% of a ReserveNumber's CPU.
_SERVER_TRACER = trace.get_tracer("accessline.grpc")


def start_server_span(method: str, metadata: Any) -> trace.Span:
    """The server span of an incoming call, continuing the caller's W3C trace context
    from its metadata, made current for the rest of the call. Each call runs in a task of
    its own, so the span is never detached: nothing can be detached in the wrong context
    when a client cancels."""
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    parent = propagate.extract(carrier)
    service, _, name = method.lstrip("/").rpartition("/")
    span = _SERVER_TRACER.start_span(
        method,
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
    )
    otel_context.attach(trace.set_span_in_context(span, parent))
    return span


def end_server_span(span: trace.Span, code: Any) -> None:
    """Ends a server span with the call's status code."""
    span.set_attribute("rpc.grpc.status_code", int(code.value[0]))
    if code.name != "OK":
        span.set_status(trace.Status(trace.StatusCode.ERROR))
    span.end()


def client_interceptors() -> list[Any]:
    """OpenTelemetry interceptors for channels to other Accessline services."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())  # type: ignore[no-untyped-call]
