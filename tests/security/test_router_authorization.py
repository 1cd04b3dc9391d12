"""The router's authorization, on real processes: a metadata service and a router with mutual TLS,
the router enforcing a policy. Each attack of issue 12 that concerns the router is tried as a
principal the policy does not allow it to: forged KV events for another pod, a foreign `Release`,
routing without a grant. Without the wiring every one of them succeeded."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.security.tls import ClientTLS
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc, router_pb2, router_pb2_grpc
from tests.security.conftest import Pki

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMPT = list(range(1001, 1009))  # 8 chained block ids
OTHER = [2001, 2002]

POLICY = {"principals": {
    "engine-*": {"events": ["self"]},  # each engine reports its own KV events only
    "client-*": {"route": True},
    "mallory": {"events": ["self"], "route": True},  # authenticated, may route: not speak for pods
    "nobody": {},  # authenticated, granted nothing
    "ops": {"admin": True},
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


async def code_of(call: object) -> grpc.StatusCode:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


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


async def routed_to(secured: SecuredRouter, blocks: Sequence[int]) -> tuple[str, int]:
    """Where `blocks` go now (the request is released again)."""
    reply = await secured.route("client-probe", blocks)
    await secured.release("client-probe", reply.request_id)
    return reply.member_id, reply.matched_blocks


async def test_forged_events_for_another_pod_change_nothing(pki: Pki, tmp_path: Path) -> None:
    async with secured_router(pki, tmp_path) as secured:
        assert await routed_to(secured, PROMPT) == ("engine-0", len(PROMPT))
        applied = (await secured.stats()).events_applied
        # The attack: clear engine-0's view and claim engine-1 (or an attacker's pod) holds the
        # prompt. Each forged batch is refused before it changes anything.
        assert await code_of(secured.report("mallory", cleared("engine-0"))) == grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(secured.report("mallory", stored("engine-1", PROMPT))) == \
            grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(secured.report("nobody", stored("nobody", PROMPT))) == \
            grpc.StatusCode.PERMISSION_DENIED
        # A real engine may not speak for another one either. Its own batch before the forged
        # one stays applied (it was authorized); the stream ends at the forged one.
        assert await code_of(secured.report("engine-1", stored("engine-1", OTHER), cleared("engine-0"),
                                            stored("engine-1", PROMPT))) == grpc.StatusCode.PERMISSION_DENIED
        assert (await secured.stats()).events_applied == applied + 1
        assert await routed_to(secured, PROMPT) == ("engine-0", len(PROMPT))
        assert await routed_to(secured, OTHER) == ("engine-1", len(OTHER))
        # An admin may (an operator repairing the view).
        assert (await secured.report("ops", cleared("engine-0"))).applied_events == 1


async def test_release_only_by_the_principal_that_routed(pki: Pki, tmp_path: Path) -> None:
    async with secured_router(pki, tmp_path) as secured:
        mine = await secured.route("client-a", PROMPT)
        assert mine.request_id and (await secured.stats()).inflight == 1
        # Another principal's release answers exactly like an unknown id's, and changes nothing.
        foreign = await secured.release("client-b", mine.request_id)
        unknown = await secured.release("client-b", "r0123456789abcdef01234567")
        assert foreign == unknown == router_pb2.ReleaseResponse()
        assert (await secured.stats()).inflight == 1
        # Reusing the id to route (a retry counts once) does not touch client-a's request either.
        theirs = await secured.route("client-b", PROMPT, request_id=mine.request_id)
        assert theirs.request_id == mine.request_id
        assert (await secured.stats()).inflight == 2
        await secured.release("client-b", mine.request_id)
        assert (await secured.stats()).inflight == 1
        await secured.release("client-a", mine.request_id)
        assert (await secured.stats()).inflight == 0
        # Requests routed on a stream belong to the stream's principal the same way.
        async with secured.stub("client-a") as stub:
            call = stub.RouteStream()
            await call.write(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=PROMPT)))
            streamed = await call.read()
            await call.done_writing()
        await secured.release("client-b", streamed.request_id)
        assert (await secured.stats()).inflight == 1
        # An admin may release anyone's request.
        await secured.release("ops", streamed.request_id)
        assert (await secured.stats()).inflight == 0


async def test_routing_needs_a_grant(pki: Pki, tmp_path: Path) -> None:
    async with secured_router(pki, tmp_path) as secured:
        routed = (await secured.stats()).routed
        assert await code_of(secured.route("nobody", PROMPT)) == grpc.StatusCode.PERMISSION_DENIED
        assert await code_of(secured.release("nobody", "r1")) == grpc.StatusCode.PERMISSION_DENIED
        async with secured.stub("nobody") as stub:
            call = stub.RouteStream(iter([router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=PROMPT))]))
            assert await code_of(call.read()) == grpc.StatusCode.PERMISSION_DENIED
        # No certificate at all: the TLS handshake is refused (mutual TLS), nothing is routed.
        async with open_channel(secured.router, tls=secured.client(None)) as channel:
            request = router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=PROMPT))
            assert await code_of(router_pb2_grpc.RouterStub(channel).Route(request, timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE
        assert (await secured.stats()).routed == routed
        assert (await secured.route("client-a", PROMPT)).member_id == "engine-0"  # still serving
