"""Authentication on a real service process with a policy: bearer tokens (hashed in the policy) and
certificate identities; health answers anyone, reflection only admins."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.security.identity import token_digest
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import metadata_pb2, metadata_pb2_grpc
from tests.security.conftest import Pki

pytestmark = pytest.mark.integration

TENANT_TOKEN = "tenant-a-7c2f0e4b9d"
ADMIN_TOKEN = "ops-51b3aa90e1"


def _policy(path: Path) -> Path:
    path.write_text(json.dumps({"principals": {
        "tenant-a": {"tokens_sha256": [token_digest(TENANT_TOKEN)], "namespaces": {"read": ["tenant-a"]}},
        "ops": {"tokens_sha256": [token_digest(ADMIN_TOKEN)], "admin": True},
        "cert-admin": {"admin": True},
        "cachenode-*": {"register": {"roles": ["cachenode"], "members": ["self"]}},
    }}))
    return path


def _token_client(pki: Pki, token: str | None) -> ClientTLS:
    return ClientTLS(TLSFiles(tls_ca=pki.ca.cert_path), (lambda: token) if token else None)


async def _reflection_status(channel: grpc.aio.Channel) -> None:
    """Opens reflection's bidirectional stream and waits for its status without sending a request.

    The refusal comes before the server reads anything. A client that is still writing its first
    request when that status arrives can see its own failed write instead: grpc.aio reports that
    as INTERNAL. Not writing keeps the observed status the server's own.
    """
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(timeout=5)
    code = await call.code()
    if code != grpc.StatusCode.OK:
        raise grpc.aio.AioRpcError(code, await call.initial_metadata(), await call.trailing_metadata(),
                                   await call.details())


async def _code(address: str, tls: ClientTLS, call: Callable[[grpc.aio.Channel], object]) -> grpc.StatusCode:
    async with open_channel(address, tls=tls) as channel:
        try:
            await call(channel)  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _list(channel: grpc.aio.Channel) -> object:
    return metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)


async def _services(channel: grpc.aio.Channel) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    async for reply in stub.ServerReflectionInfo(iter([request]), timeout=5):
        return sorted(s.name for s in reply.list_services_response.service)
    return []


async def _watch_first(channel: grpc.aio.Channel) -> None:
    """A server-streaming call: the first event of a membership watch (its snapshot)."""
    call = metadata_pb2_grpc.MembershipStub(channel).Watch(metadata_pb2.WatchRequest(), timeout=5)
    async for _ in call:
        break
    call.cancel()


def _health(channel: grpc.aio.Channel) -> object:
    return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)


async def test_bearer_tokens_over_tls(pki: Pki, tmp_path: Path) -> None:
    settings = pki.server_flags(pki.issue("metadata"), require_client_cert=False,
                                security_policy=_policy(tmp_path / "policy.json"))
    async with process_mesh(metadata=1, metadata_settings=settings, wait_registered=False) as mesh:
        address = mesh.metadata_address
        tenant, admin = _token_client(pki, TENANT_TOKEN), _token_client(pki, ADMIN_TOKEN)
        anonymous, forged = _token_client(pki, None), _token_client(pki, "tenant-a-guess")
        assert await _code(address, tenant, _list) == grpc.StatusCode.OK
        assert await _code(address, anonymous, _list) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(address, forged, _list) == grpc.StatusCode.UNAUTHENTICATED
        # Streaming calls are authenticated the same way.
        assert await _code(address, tenant, _watch_first) == grpc.StatusCode.OK
        assert await _code(address, anonymous, _watch_first) == grpc.StatusCode.UNAUTHENTICATED
        # Probes carry no credentials: health answers anyone.
        assert await _code(address, anonymous, _health) == grpc.StatusCode.OK
        # Reflection: only for admins.
        assert await _code(address, anonymous, _reflection_status) == grpc.StatusCode.UNAUTHENTICATED
        assert await _code(address, tenant, _reflection_status) == grpc.StatusCode.PERMISSION_DENIED
        async with open_channel(address, tls=admin) as channel:
            assert "kvmesh.v1.Membership" in await _services(channel)
        assert await _code(address, tenant, _list) == grpc.StatusCode.OK  # still serving


async def test_certificate_identities_with_a_policy(pki: Pki, tmp_path: Path) -> None:
    settings = pki.server_flags(pki.issue("metadata"), security_policy=_policy(tmp_path / "policy.json"))
    async with process_mesh(metadata=1, metadata_settings=settings, wait_registered=False) as mesh:
        address = mesh.metadata_address
        node, admin = pki.client(pki.issue("engine-0")), pki.client(pki.issue("cert-admin"))
        assert await _code(address, node, _list) == grpc.StatusCode.OK  # any authenticated principal may list
        assert await _code(address, node, _reflection_status) == grpc.StatusCode.PERMISSION_DENIED
        async with open_channel(address, tls=admin) as channel:
            assert "grpc.health.v1.Health" in await _services(channel)
            # A member process registers and keeps its 2 s lease alive (a bidirectional stream)
            # through the interceptor with its certificate's identity.
            await mesh.add("cachenode", ttl_seconds=2, **pki.server_flags(pki.issue("cachenode-0")))
            stub = metadata_pb2_grpc.MembershipStub(channel)

            async def listed() -> bool:
                reply = await stub.List(metadata_pb2.ListRequest(), timeout=5)
                assert [m.id for m in reply.members] == ["cachenode-0"], reply
                return True

            await eventually(listed, timeout=20, what="the cache node listed", retry_on=(AssertionError,))
            await asyncio.sleep(5)  # 2.5 TTLs: only heartbeats keep it listed
            assert await listed()
