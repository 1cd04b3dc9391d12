"""A metadata service and a router on mutual TLS, the router enforcing a policy, two engine
members registered, engine-0 holding PROMPT: the mesh the router's security tests attack."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.security.identity import token_digest
from kvmesh.security.tls import ClientTLS
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc, router_pb2, router_pb2_grpc
from tests.security.conftest import Pki

PROMPT = list(range(1001, 1009))  # 8 chained block ids
OTHER = [2001, 2002]
CLIENT_TOKEN = "client-token-5d1e9b07c4"  # a bearer token (the policy holds its digest)

POLICY = {"principals": {
    "engine-*": {"events": ["self"]},  # each engine reports its own KV events only
    "client-*": {"route": True},
    "gateway": {"route": True},  # Envoy, at the endpoint picker
    "mallory": {"events": ["self"], "route": True},  # authenticated, may route: not speak for pods
    "nobody": {},  # authenticated, granted nothing
    "ops": {"admin": True},
    "client-token": {"tokens_sha256": [token_digest(CLIENT_TOKEN)], "route": True},
}}


@dataclass
class SecuredRouter:
    pki: Pki
    router: str
    metadata: str

    def client(self, name: str | None) -> ClientTLS:
        return self.pki.client(self.pki.issue(name) if name else None)

    @contextlib.asynccontextmanager
    async def stub(self, name: str | None) -> AsyncIterator[router_pb2_grpc.RouterStub]:
        async with open_channel(self.router, tls=self.client(name)) as channel:
            yield router_pb2_grpc.RouterStub(channel)

    async def stats(self) -> router_pb2.RouterStatsResponse:
        async with self.stub("client-stats") as stub:
            return await stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)

    async def route(self, name: str, blocks: Sequence[int], request_id: str = "") -> router_pb2.RouteResponse:
        async with self.stub(name) as stub:
            request = router_pb2.RouteRequest(request_id=request_id, blocks=router_pb2.BlockIds(ids=blocks))
            return await stub.Route(request, timeout=5)

    async def release(self, name: str, request_id: str) -> router_pb2.ReleaseResponse:
        async with self.stub(name) as stub:
            return await stub.Release(router_pb2.ReleaseRequest(request_id=request_id), timeout=5)

    async def report(self, name: str, *batches: router_pb2.KvEventBatch) -> router_pb2.ReportEventsResponse:
        async with self.stub(name) as stub:
            return await stub.ReportEvents(iter(batches), timeout=5)


def stored(member_id: str, ids: Sequence[int]) -> router_pb2.KvEventBatch:
    return router_pb2.KvEventBatch(member_id=member_id, events=[
        router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=0, ids=ids))])


def cleared(member_id: str) -> router_pb2.KvEventBatch:
    return router_pb2.KvEventBatch(member_id=member_id, events=[
        router_pb2.KvEvent(cleared=router_pb2.AllBlocksCleared())])



# grpc-python's aio client sends a client stream's requests from a task of its own; when the server
# ends the call (a refusal) while that task still has a message to send, the send fails and the
# client reports INTERNAL "Internal error from Core" instead of the server's status (about one
# three-batch stream in twelve here). The server did refuse: the tests check that nothing changed.
CLIENT_SEND_RACE = "Internal error from Core"


def refused_stream(exc: grpc.aio.AioRpcError, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> bool:
    """A stream the server ended with `code` (or whose status the client lost to its send race)."""
    return exc.code() == code or (exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CLIENT_SEND_RACE)


async def events_refused(call: object) -> bool:
    """A `ReportEvents` stream ended PERMISSION_DENIED (or lost that status to the client's race)."""
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return refused_stream(exc)
    return False


@contextlib.asynccontextmanager
async def secured_router(pki: Pki, tmp_path: Path, **router: object) -> AsyncIterator[SecuredRouter]:
    """Metadata (mutual TLS) and a router (mutual TLS and the policy), two engine members
    registered, engine-0 holding PROMPT (its own, authorized, KV events)."""
    policy = tmp_path / "router-policy.json"
    policy.write_text(json.dumps(POLICY))
    async with process_mesh(
        metadata=1, routers=1, wait_registered=False,
        metadata_settings=pki.server_flags(pki.issue("metadata")),
        router_settings={**pki.server_flags(pki.issue("router-0")), "security_policy": policy,
                         "policy": "prefix", "register_self": False, **router},
    ) as mesh:
        secured = SecuredRouter(pki, mesh.router_address, mesh.metadata_address)
        async with open_channel(mesh.metadata_address, tls=secured.client("registrar")) as channel:
            membership = metadata_pb2_grpc.MembershipStub(channel)
            for i in range(2):
                member = common_pb2.Member(id=f"engine-{i}", role=common_pb2.ROLE_ENGINE,
                                           address=f"127.0.0.1:{9100 + i}")
                await membership.Register(metadata_pb2.RegisterRequest(member=member, ttl_seconds=600), timeout=5)

        async def both_engines() -> bool:
            assert (await secured.stats()).members == 2
            return True

        await eventually(both_engines, timeout=20, what="the router to see both engines",
                         retry_on=(AssertionError, grpc.aio.AioRpcError))
        reply = await secured.report("engine-0", stored("engine-0", PROMPT))
        assert reply.applied_events == 1, reply
        yield secured
