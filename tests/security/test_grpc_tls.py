"""TLS and mutual TLS on a real service process: the round trip, and every refusal (wrong CA, expired
certificate, no client certificate, plaintext) while the service keeps serving; rotation on disk."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.security.tls import ClientTLS
from kvmesh.tools.certs import make_ca
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc
from tests.security.conftest import Pki
from tests.security.tls_probe import served_certificate

pytestmark = pytest.mark.integration


async def _list(address: str, tls: ClientTLS | None) -> list[str]:
    async with open_channel(address, tls=tls) as channel:
        reply = await metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)
        return sorted(m.id for m in reply.members)


async def _refused(address: str, tls: ClientTLS | None, plaintext: bool = False) -> grpc.StatusCode:
    channel = grpc.aio.insecure_channel(address) if plaintext else open_channel(address, tls=tls)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)
    return err.value.code()


async def test_mtls_round_trip_and_every_refusal(pki: Pki) -> None:
    server = pki.issue("metadata")
    client = pki.client(pki.issue("ops"))
    async with process_mesh(metadata=1, metadata_settings=pki.server_flags(server), wait_registered=False) as mesh:
        address = mesh.metadata_address
        # A cache node process registers over mTLS with its own certificate (its process's channels
        # take its --tls-* flags), and a client registers and lists.
        await mesh.add("cachenode", **pki.server_flags(pki.issue("cachenode-0")))
        async with open_channel(address, tls=client) as channel:
            stub = metadata_pb2_grpc.MembershipStub(channel)
            member = common_pb2.Member(id="engine-x", role=common_pb2.ROLE_ENGINE, address="127.0.0.1:1")
            reg = await stub.Register(metadata_pb2.RegisterRequest(member=member, ttl_seconds=30), timeout=5)
            assert reg.lease_id > 0

            async def both_listed() -> bool:
                assert await _list(address, client) == ["cachenode-0", "engine-x"]
                return True

            await eventually(both_listed, timeout=20, what="both members listed over mTLS",
                             retry_on=(AssertionError,))

        # Refused at the handshake (UNAVAILABLE), each time with the service still serving:
        other_ca = make_ca(pki.directory / "other", "another CA")
        from kvmesh.tools.certs import issue

        foreign = issue(other_ca, "ops", pki.directory / "other")
        expired = pki.issue("expired", not_before=dt.datetime.now(dt.UTC) - dt.timedelta(days=10),
                            not_after=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        cases = {
            "client certificate from another CA": pki.client(foreign),
            "expired client certificate": pki.client(expired),
            "no client certificate": pki.client(None),
            "server not trusted (client trusts another CA)": pki.client(pki.issue("ops2"), ca=other_ca.cert_path),
        }
        for what, tls in cases.items():
            assert await _refused(address, tls) == grpc.StatusCode.UNAVAILABLE, what
            assert await _list(address, client) == ["cachenode-0", "engine-x"], f"still serving after: {what}"
        assert await _refused(address, None, plaintext=True) == grpc.StatusCode.UNAVAILABLE
        assert await _list(address, client) == ["cachenode-0", "engine-x"]
        assert not mesh.of_role("metadata")[0].process.returncode  # type: ignore[union-attr]


async def test_certificates_rotate_on_disk_without_a_restart(pki: Pki) -> None:
    first = pki.issue("metadata")
    client_cert = pki.issue("ops")
    client = pki.client(client_cert)
    async with process_mesh(metadata=1, metadata_settings=pki.server_flags(first), wait_registered=False) as mesh:
        address = mesh.metadata_address
        assert served_certificate(address, pki.ca.cert_path, client_cert.cert, client_cert.key).serial_number \
            == first.serial
        async with open_channel(address, tls=client) as old:
            stub = metadata_pb2_grpc.MembershipStub(old)
            await stub.List(metadata_pb2.ListRequest(), timeout=5)
            second = pki.issue("metadata")  # the same files, rewritten
            assert second.serial != first.serial
            # New connections get the new certificate ...
            served = served_certificate(address, pki.ca.cert_path, client_cert.cert, client_cert.key)
            assert served.serial_number == second.serial
            assert await _list(address, client) == []
            # ... while the connection opened before keeps working.
            await stub.List(metadata_pb2.ListRequest(), timeout=5)
            assert old.get_state() == grpc.ChannelConnectivity.READY
