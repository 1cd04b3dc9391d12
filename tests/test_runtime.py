"""The shared server runtime: health, reflection, message limits, shutdown order, telemetry, CLI."""

from __future__ import annotations

import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime, Service, advertised_address
from kvmesh.settings import ServiceSettings
from kvmesh.telemetry import meter, setup_telemetry
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import router_pb2, router_pb2_grpc


class EchoRouter(router_pb2_grpc.RouterServicer):  # only Route is needed
    """A minimal Router that echoes the request id (enough to exercise the runtime)."""

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        return router_pb2.RouteResponse(request_id=request.request_id, policy=request.text[:8])


class RecordingService(Service):
    name = "echo"
    service_names = ("kvmesh.v1.Router",)

    def __init__(self) -> None:
        self.calls: list[str] = []

    def register(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(EchoRouter(), server)  # type: ignore[abstract]

    async def start(self, address: str) -> None:
        self.calls.append(f"start {address}")

    async def drain(self) -> None:
        self.calls.append("drain")

    async def close(self) -> None:
        self.calls.append("close")


async def test_runtime_serves_health_reflection_and_stops_in_order() -> None:
    service = RecordingService()
    settings = ServiceSettings(listen="127.0.0.1:0", max_message_bytes=64 * 1024)
    runtime = ServerRuntime(service, settings)
    address = await runtime.start()
    assert await runtime.start() == address  # idempotent
    channel = open_channel(address)
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "kvmesh.v1.Router"):
            resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING

        refl = reflection_pb2_grpc.ServerReflectionStub(channel)

        async def ask() -> object:
            yield reflection_pb2.ServerReflectionRequest(list_services="")

        async for answer in refl.ServerReflectionInfo(ask()):
            names = {s.name for s in answer.list_services_response.service}
            assert {"kvmesh.v1.Router", "grpc.health.v1.Health"} <= names
            break

        stub = router_pb2_grpc.RouterStub(channel)
        ok = await stub.Route(router_pb2.RouteRequest(request_id="r1", text="hello"))
        assert ok.request_id == "r1"
        # The server's message limit comes from config: an oversized request is refused, the server lives on.
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await stub.Route(router_pb2.RouteRequest(request_id="big", text="x" * 200_000))
        assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await stub.Route(router_pb2.RouteRequest(request_id="r2"))).request_id == "r2"
    finally:
        await channel.close()
    await runtime.stop()
    await runtime.stop()  # idempotent
    assert service.calls == [f"start {address}", "drain", "close"]


async def test_runtime_as_async_context_manager_stops_even_when_the_body_raises() -> None:
    service = RecordingService()
    async with ServerRuntime(service, ServiceSettings(listen="127.0.0.1:0")) as runtime:
        address = runtime.address
        async with open_channel(address) as channel:
            resp = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
    assert service.calls == [f"start {address}", "drain", "close"]

    failing = RecordingService()
    with pytest.raises(RuntimeError, match="boom"):
        async with ServerRuntime(failing, ServiceSettings(listen="127.0.0.1:0")) as runtime:
            raise RuntimeError("boom")
    assert failing.calls == [f"start {runtime.address}", "drain", "close"]
    async with open_channel(runtime.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert exc.value.code() == grpc.StatusCode.UNAVAILABLE  # nothing listens any more


def test_advertised_address() -> None:
    assert advertised_address("127.0.0.1:0", 4321, None) == "127.0.0.1:4321"
    assert advertised_address("0.0.0.0:80", 80, "pod-1.svc:80") == "pod-1.svc:80"
    assert not advertised_address("0.0.0.0:80", 80, None).startswith("0.0.0.0")


def test_prometheus_metrics_endpoint() -> None:
    port = free_port()
    tel = setup_telemetry("test", metrics_port=port)
    try:
        meter("test").create_counter("kvmesh_test_events").add(3)
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "kvmesh_test_events" in body
    finally:
        tel.shutdown()


def test_cli_version_and_unknown_command() -> None:
    out = subprocess.run([sys.executable, "-m", "kvmesh", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("kvmesh ")
    bad = subprocess.run([sys.executable, "-m", "kvmesh", "no-such-command"], capture_output=True, text=True)
    assert bad.returncode == 2


def test_a_serving_process_moves_its_startup_heap_out_of_the_collectors_view() -> None:
    import subprocess
    import sys

    code = ("import gc, kvmesh.services.router.service\n"
            "from kvmesh.runtime.server import freeze_startup_heap\n"
            "before = len(gc.get_objects())\n"
            "freeze_startup_heap()\n"
            "print(before, gc.get_freeze_count(), len(gc.get_objects()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, frozen, after = map(int, out.stdout.split())
    assert before > 10_000 and frozen > 10_000 and after < 100  # a full collection now skips them
