"""The router's two other doors: the Envoy endpoint picker (the service's own TLS files and policy,
the gateway's principal must be allowed to route) and the ZMQ KV-event listener (plain ZMQ: never
bound beyond this host by default, a loud warning when a policy-enforcing router does)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.services.router.core import RouterCore
from kvmesh.services.router.ext_proc.server import ExtProcServer
from kvmesh.services.router.kv_events.exposure import host_only, warn_if_exposed
from kvmesh.services.router.kv_events.subscriber import KvEventSubscriber
from kvmesh.services.router.settings import RouterSettings
from tests.router.helpers import member
from tests.security.conftest import Pki
from tests.security.router_mesh import POLICY, refused_stream

MODEL = "m"


@pytest.fixture
async def picker(pki: Pki, tmp_path: Path) -> AsyncIterator[tuple[RouterCore, str]]:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    settings = RouterSettings(ext_proc_listen="127.0.0.1:0", security_policy=policy,
                              **pki.server_flags(pki.issue("router-0")))
    core = RouterCore(settings=settings)
    core.add_member(member("engine-0", model=MODEL, port=9100))
    server = ExtProcServer(core, settings)
    port = await server.start()
    try:
        yield core, f"127.0.0.1:{port}"
    finally:
        await server.close(0)


async def _pick(pki: Pki, address: str, name: str | None) -> tuple[grpc.StatusCode, ep.ProcessingResponse | None]:
    """One HTTP request's exchange (headers, then the whole body) as principal `name`."""
    body = json.dumps({"model": MODEL, "prompt": "route me " * 30}).encode()
    async with open_channel(address, tls=pki.client(pki.issue(name) if name else None)) as channel:
        call = ep_grpc.ExternalProcessorStub(channel).Process(timeout=5)
        try:
            await call.write(ep.ProcessingRequest(request_headers=ep.HttpHeaders()))
            await call.read()
            await call.write(ep.ProcessingRequest(request_body=ep.HttpBody(body=body, end_of_stream=True)))
            answer = await call.read()
            await call.done_writing()
            await call.code()  # the stream has ended before the channel closes and the fixture stops the server
            return grpc.StatusCode.OK, answer
        except grpc.aio.AioRpcError as exc:
            # A refusal may race the client's own send (see router_mesh.CLIENT_SEND_RACE).
            return (grpc.StatusCode.PERMISSION_DENIED if refused_stream(exc) else exc.code()), None


async def test_picker_serves_the_services_tls_and_authorizes_the_gateway(
        pki: Pki, picker: tuple[RouterCore, str]) -> None:
    core, address = picker
    code, answer = await _pick(pki, address, "gateway")
    assert code == grpc.StatusCode.OK and answer is not None
    assert answer.dynamic_metadata["envoy.lb"]["x-gateway-destination-endpoint"] == "127.0.0.1:9100"
    routed = core.routed
    # Authenticated but not allowed to route; then no client certificate (mutual TLS refuses it).
    assert (await _pick(pki, address, "nobody"))[0] == grpc.StatusCode.PERMISSION_DENIED
    assert (await _pick(pki, address, None))[0] == grpc.StatusCode.UNAVAILABLE
    assert core.routed == routed
    assert core.stats().inflight == 0  # the gateway's stream closed: its request was released
    # Health answers any client the TLS layer lets in (probes carry no principal).
    async with open_channel(address, tls=pki.client(pki.issue("nobody"))) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("endpoint,local", [
    ("tcp://127.0.0.1:5557", True), ("tcp://127.0.0.2:5557", True), ("tcp://[::1]:5557", True),
    ("tcp://localhost:5557", True), ("ipc:///run/kv.sock", True), ("inproc://kv", True),
    ("tcp://*:5557", False), ("tcp://0.0.0.0:5557", False), ("tcp://10.1.2.3:5557", False),
    ("tcp://eth0:5557", False), ("tcp://[::]:5557", False), ("udp://127.0.0.1:5557", False),
])
def test_host_only_endpoints(endpoint: str, local: bool) -> None:
    assert host_only(endpoint) is local


def test_kv_event_listener_exposure_warning(caplog: pytest.LogCaptureFixture) -> None:
    assert RouterSettings().kv_events_listen == ""  # off by default: nothing binds
    with caplog.at_level(logging.ERROR, logger="kvmesh.router.kv_events"):
        assert not warn_if_exposed("tcp://*:5557", policy_enforced=False)
        assert not warn_if_exposed("tcp://127.0.0.1:5557", policy_enforced=True)
        assert not caplog.records
        assert warn_if_exposed("tcp://*:5557", policy_enforced=True)
    assert "SECURITY" in caplog.text and "tcp://*:5557" in caplog.text


async def test_router_with_a_policy_warns_when_it_binds_kv_events_widely(
        pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(POLICY))
    # The interface name `lo` binds loopback only (tests bind nothing wider), but the router does
    # not trust a name it cannot check, so it warns as it would for a wildcard.
    settings = RouterSettings(kv_events_listen="tcp://lo:0", security_policy=policy)
    subscriber = KvEventSubscriber(RouterCore(settings=settings), settings)
    with caplog.at_level(logging.ERROR, logger="kvmesh.router.kv_events"):
        await subscriber.start()
        assert subscriber.bound_endpoint.startswith("tcp://127.0.0.1:")
        await subscriber.close()
    assert "reachable from other hosts" in caplog.text
