"""`kvmesh up` is secure by default: a local CA in the state folder, the whole mesh on mutual TLS
with a policy enforced (every member registers over it, the router routes over it); plaintext,
certificate-less and foreign-CA clients are refused, reflection answers only admins. `--insecure`
serves plaintext, with a warning."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.certs import CA, issue, make_ca
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc, router_pb2, router_pb2_grpc
from tests.conftest import KvmeshFactory
from tests.e2e.test_up import SMALL, cli_tls, ready_fields

pytestmark = pytest.mark.integration

MEMBERS = ("metadata", "cachenode-0", "router", "engine-0", "engine-1", "kvmesh-up", "kvmesh-cli")


async def _roles(address: str, tls: ClientTLS | None) -> list[str]:
    channel = open_channel(address, tls=tls) if tls else grpc.aio.insecure_channel(address)
    async with channel:
        reply = await metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)
    return sorted(common_pb2.Role.Name(m.role) for m in reply.members)


async def _route(address: str, tls: ClientTLS) -> str:
    async with open_channel(address, tls=tls) as channel:
        reply = await router_pb2_grpc.RouterStub(channel).Route(router_pb2.RouteRequest(text="hello"), timeout=5)
    return reply.member_id


async def _reflect(address: str, tls: ClientTLS) -> list[str]:
    """The services reflection lists to this client."""
    async with open_channel(address, tls=tls) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
            return [s.name for s in reply.list_services_response.service]
    return []


def _no_certificate(ca: CA) -> ClientTLS:
    """Trusts the mesh's CA but presents no certificate of its own."""
    return ClientTLS(TLSFiles(tls_ca=ca.cert_path))


def _foreign(tmp_path: Path, ca: CA) -> ClientTLS:
    """A certificate from another CA, named like a member."""
    other = make_ca(tmp_path / "other", "another CA")
    cert = issue(other, "kvmesh-up", tmp_path / "other")
    return ClientTLS(TLSFiles(tls_cert=cert.cert, tls_key=cert.key, tls_ca=ca.cert_path))


def test_up_runs_the_mesh_on_mutual_tls_and_a_policy_by_default(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = kvmesh("up", *SMALL, "--state-dir", str(state), timeout=120)
    fields = ready_fields(proc)
    metadata, router = fields["metadata"], fields["address"]
    ca = CA.load(state)
    cli = cli_tls(state)
    assert asyncio.run(_roles(metadata, cli)) == ["ROLE_CACHENODE", "ROLE_ENGINE", "ROLE_ENGINE", "ROLE_ROUTER"]
    # Every member's port refuses a plaintext client, a client without a certificate and one from
    # another CA: the handshake fails before any call (UNAVAILABLE).
    for refused in (None, _no_certificate(ca), _foreign(tmp_path, ca)):
        for address in (metadata, router):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                asyncio.run(_roles(address, refused))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (address, refused)
    assert asyncio.run(_route(router, cli)) in ("engine-0", "engine-1")
    # The policy is in force: kvmesh-cli is not admin, so reflection refuses it; the supervisor's
    # certificate (admin) lists the services.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        asyncio.run(_reflect(metadata, cli))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = ClientTLS(TLSFiles(tls_cert=state / "kvmesh-up.pem", tls_key=state / "kvmesh-up-key.pem",
                               tls_ca=ca.cert_path))
    assert "kvmesh.v1.Membership" in asyncio.run(_reflect(metadata, admin))
    # Where the credentials are and how a client connects.
    assert "mutual TLS on, policy enforced" in proc.output
    assert f". {state / 'client.env'}" in proc.output and "insecure" not in proc.output.lower()
    env = (state / "client.env").read_text()
    assert f"KVMESH_TLS_CERT={state / 'kvmesh-cli.pem'}" in env and f"KVMESH_TLS_CA={state / 'ca.pem'}" in env
    # What the printed help says works: the CLI tools with client.env's variables.
    exported = {"COLUMNS": "200"}
    for line in env.splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        exported[key] = value
    listing = kvmesh("members", "--metadata", metadata, env=exported, ready=False)
    assert listing.wait_exit(30) == 0, listing.output
    assert "4 members" in listing.output and "engine-1" in listing.output, listing.output
    anonymous = kvmesh("members", "--metadata", metadata, "--timeout", "3", env={"COLUMNS": "200"}, ready=False)
    assert anonymous.wait_exit(30) != 0 and "engine-1" not in anonymous.output  # no credentials: refused
    proc.proc.send_signal(signal.SIGINT)
    assert proc.wait_exit(40) == 0, proc.output[-3000:]
    assert sorted(p.name for p in state.glob("*.pem")) == sorted(
        ["ca.pem", "ca-key.pem", *(f"{n}.pem" for n in MEMBERS), *(f"{n}-key.pem" for n in MEMBERS)])
    assert (state / "policy.yaml").is_file()


def test_a_second_run_reuses_the_ca_and_secure_is_an_accepted_alias(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = make_ca(state, "kvmesh development CA")
    proc = kvmesh("up", *SMALL, "--engines", "1", "--secure", "--state-dir", str(state), timeout=120)
    metadata = ready_fields(proc)["metadata"]
    assert CA.load(state).cert.serial_number == first.cert.serial_number  # a client trusting it keeps working
    assert asyncio.run(_roles(metadata, cli_tls(state))) == ["ROLE_CACHENODE", "ROLE_ENGINE", "ROLE_ROUTER"]
    helper = kvmesh("up", "--help", ready=False)
    assert helper.wait_exit(30) == 0
    assert "--insecure" in helper.output and "--secure" not in helper.output  # the alias stays hidden


def test_insecure_serves_plaintext_and_warns(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    state = tmp_path / "state"
    proc = kvmesh("up", *SMALL, "--engines", "1", "--insecure", "--state-dir", str(state), timeout=120)
    metadata = ready_fields(proc)["metadata"]
    assert asyncio.run(_roles(metadata, None)) == ["ROLE_CACHENODE", "ROLE_ENGINE", "ROLE_ROUTER"]
    assert "WARNING: --insecure" in proc.output and "mutual TLS on" not in proc.output
    assert not state.exists()  # no credentials made
