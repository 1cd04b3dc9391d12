"""Traces leave real services over OTLP: server spans and client spans between services."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually

pytestmark = pytest.mark.integration


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver that keeps (service, span name, kind) of what it gets."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, int]] = []
        self._lock = threading.Lock()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._lock:
            for resource_spans in request.resource_spans:
                attrs = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append((attrs.get("service.name", ""), span.name, span.kind))
        return trace_service_pb2.ExportTraceServiceResponse()


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    # A thread-pool server, so it keeps receiving while the test blocks on processes.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    sink = Collector()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield sink, f"127.0.0.1:{port}"
    server.stop(None)


async def test_server_and_client_spans_reach_an_otlp_collector(
    collector: tuple[Collector, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink, endpoint = collector
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # children export batches every 0.2 s, not 5 s

    def spans(kind: int) -> set[tuple[str, str]]:
        return {(svc, name) for svc, name, k in list(sink.spans) if k == kind}

    otlp = {"otlp_endpoint": endpoint}
    node_settings = {"storage": "memory://?capacity=16MiB&arena=heap", **otlp}
    async with process_mesh(cachenodes=1, metadata_settings=otlp, cachenode_settings=node_settings) as mesh:
        assert len(await mesh.listed("cachenode")) == 1
        node, metadata = mesh.member("cachenode-0"), mesh.member("metadata")
        assert node.process is not None and metadata.process is not None
        # Spans leave a running service in batches; the cache node's Register is a client span.
        register = ("kvmesh-cachenode", "/kvmesh.v1.Membership/Register")
        await eventually(lambda: register in spans(trace_pb2.Span.SPAN_KIND_CLIENT), timeout=30,
                         what=f"the cache node's Register client span (node output: {node.process.tail()})")
        await mesh.stop(node.name)  # shutdown flushes the exporters: Deregister is sent while stopping
        await mesh.stop(metadata.name)
        assert node.process.returncode == 0 and metadata.process.returncode == 0
        output = node.process.output

    server_spans = spans(trace_pb2.Span.SPAN_KIND_SERVER)
    client_spans = spans(trace_pb2.Span.SPAN_KIND_CLIENT)
    assert ("kvmesh-metadata", "/kvmesh.v1.Membership/Register") in server_spans, sorted(server_spans)
    assert ("kvmesh-metadata", "/kvmesh.v1.Membership/List") in server_spans
    assert ("kvmesh-metadata", "/kvmesh.v1.Membership/Deregister") in server_spans, sorted(server_spans)
    assert ("kvmesh-cachenode", "/kvmesh.v1.Membership/Deregister") in client_spans, (sorted(client_spans), output)
