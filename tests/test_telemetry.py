"""Traces leave real services over OTLP: server spans and client spans between services."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc

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


def test_server_and_client_spans_reach_an_otlp_collector(kvmesh, collector) -> None:
    sink, endpoint = collector
    md_port = free_port()
    metadata = kvmesh("metadata", "--listen", f"127.0.0.1:{md_port}", "--otlp-endpoint", endpoint)
    node = kvmesh(
        "cachenode", "--listen", "127.0.0.1:0", "--metadata", f"127.0.0.1:{md_port}",
        "--engine", "memory://?capacity=16MiB&arena=heap", "--otlp-endpoint", endpoint,
    )

    async def listed() -> int:
        channel = open_channel(f"127.0.0.1:{md_port}")
        try:
            stub = metadata_pb2_grpc.MembershipStub(channel)
            for _ in range(100):
                resp = await stub.List(metadata_pb2.ListRequest(role=common_pb2.ROLE_CACHENODE))
                if resp.members:
                    return len(resp.members)
                await asyncio.sleep(0.1)
            return 0
        finally:
            await channel.close()

    assert asyncio.run(listed()) == 1
    assert node.terminate() == 0 and metadata.terminate() == 0  # shutdown flushes the exporters

    server_spans = {(svc, name) for svc, name, kind in sink.spans if kind == trace_pb2.Span.SPAN_KIND_SERVER}
    client_spans = {(svc, name) for svc, name, kind in sink.spans if kind == trace_pb2.Span.SPAN_KIND_CLIENT}
    assert ("kvmesh-metadata", "/kvmesh.v1.Membership/Register") in server_spans, sorted(server_spans)
    assert ("kvmesh-metadata", "/kvmesh.v1.Membership/List") in server_spans
    assert ("kvmesh-cachenode", "/kvmesh.v1.Membership/Register") in client_spans, sorted(client_spans)
