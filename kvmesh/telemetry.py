"""OpenTelemetry traces and metrics for every service.

Traces: gRPC server and client spans, exported over OTLP when an endpoint is configured
(no spans are made otherwise, to keep the hot path free). Metrics: an OTLP reader with an
endpoint, a Prometheus `/metrics` endpoint with a port; both may be on at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace

log = logging.getLogger("kvmesh.telemetry")


@dataclass
class Telemetry:
    """What `setup_telemetry` installed, so shutdown can flush it."""

    service: str
    tracing: bool = False
    metrics_port: int | None = None
    _providers: list[Any] = field(default_factory=list)

    def server_interceptors(self) -> list[Any]:
        if not self.tracing:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor()]

    def shutdown(self) -> None:
        """Flushes and stops exporters (call last in shutdown)."""
        for provider in self._providers:
            try:
                provider.shutdown()
            except Exception:  # flushing must never block exit
                log.warning("telemetry flush failed", exc_info=True)
        self._providers.clear()


def setup_telemetry(
    service: str,
    otlp_endpoint: str | None = None,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
) -> Telemetry:
    """Installs global tracer and meter providers for this process."""
    from opentelemetry.sdk.resources import Resource

    tel = Telemetry(service=service)
    resource = Resource.create({"service.name": f"kvmesh-{service}"})
    readers: list[Any] = []
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        tracer_provider = TracerProvider(resource=resource)
        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
        trace.set_tracer_provider(tracer_provider)
        tel._providers.append(tracer_provider)
        tel.tracing = True
        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True)))
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import start_http_server

        start_http_server(metrics_port, addr=metrics_host)
        readers.append(PrometheusMetricReader())
        tel.metrics_port = metrics_port
    if readers:
        from opentelemetry.sdk.metrics import MeterProvider

        meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        metrics.set_meter_provider(meter_provider)
        tel._providers.append(meter_provider)
    return tel


def tracing_enabled() -> bool:
    """True once `setup_telemetry` installed an exporting tracer provider in this process."""
    return type(trace.get_tracer_provider()).__module__.startswith("opentelemetry.sdk")


def meter(name: str) -> metrics.Meter:
    """The meter for one component; a no-op meter when no reader is configured."""
    return metrics.get_meter(f"kvmesh.{name}")
