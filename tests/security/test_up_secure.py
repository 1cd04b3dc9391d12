"""`kvmesh up --secure`: a local CA in the state folder and the whole mesh on mutual TLS (every
member registers over it, the router routes over it); plaintext and foreign certificates are refused."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.certs import CA, issue, make_ca
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import KvmeshFactory
from tests.e2e.test_up import SMALL, ready_fields

pytestmark = pytest.mark.integration


async def _roles(address: str, tls: ClientTLS | None) -> list[str]:
    channel = open_channel(address, tls=tls) if tls else grpc.aio.insecure_channel(address)
    async with channel:
        reply = await metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)
    return sorted(common_pb2.Role.Name(m.role) for m in reply.members)


async def _route(address: str, tls: ClientTLS) -> str:
    async with open_channel(address, tls=tls) as channel:
        reply = await router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(text="hello"), timeout=5)
    return reply.member_id


def test_up_secure_runs_the_mesh_over_mutual_tls(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = kvmesh("up", *SMALL, "--secure", "--state-dir", str(state), timeout=120)
    fields = ready_fields(proc)
    metadata = fields["metadata"]
    ca = CA.load(state)
    mine = issue(ca, "test-client", tmp_path)
    tls = ClientTLS(TLSFiles(tls_cert=mine.cert, tls_key=mine.key, tls_ca=ca.cert_path))
    assert asyncio.run(_roles(metadata, tls)) == ["ROLE_CACHENODE", "ROLE_ENGINE", "ROLE_ENGINE", "ROLE_ROUTER"]
    for refused in (None, _foreign(tmp_path, ca)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(_roles(metadata, refused))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert asyncio.run(_route(fields["address"], tls)) in ("engine-0", "engine-1")
    assert "mutual TLS on" in proc.output
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait_exit(40) == 0, proc.output[-3000:]
    assert sorted(p.name for p in state.glob("*.pem")) == sorted(
        ["ca.pem", "ca-key.pem", *(f"{n}.pem" for n in ("metadata", "cachenode-0", "router", "engine-0",
                                                       "engine-1", "kvmesh-up")),
         *(f"{n}-key.pem" for n in ("metadata", "cachenode-0", "router", "engine-0", "engine-1", "kvmesh-up"))])


def _foreign(tmp_path: Path, ca: CA) -> ClientTLS:
    other = make_ca(tmp_path / "other", "another CA")
    cert = issue(other, "test-client", tmp_path / "other")
    return ClientTLS(TLSFiles(tls_cert=cert.cert, tls_key=cert.key, tls_ca=ca.cert_path))
