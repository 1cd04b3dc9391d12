"""The router's authorization, on real processes: a metadata service and a router with mutual TLS,
the router enforcing a policy. Each attack of issue 12 that concerns the router is tried as a
principal the policy does not allow it to: forged KV events for another pod, a foreign `Release`,
routing without a grant. Without the wiring every one of them succeeded."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.testing.status import status_of
from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.security.conftest import Pki
from tests.security.router_mesh import (
    OTHER,
    PROMPT,
    SecuredRouter,
    cleared,
    events_refused,
    refused_stream,
    secured_router,
    stored,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


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
        assert await events_refused(secured.report("mallory", cleared("engine-0")))
        assert await events_refused(secured.report("mallory", stored("engine-1", PROMPT)))
        assert await events_refused(secured.report("nobody", stored("nobody", PROMPT)))
        # A real engine may not speak for another one either. Its own batch before the forged
        # one stays applied (it was authorized); the stream ends at the forged one.
        assert await events_refused(secured.report("engine-1", stored("engine-1", OTHER), cleared("engine-0"),
                                                  stored("engine-1", PROMPT)))
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
        assert await status_of(secured.route("nobody", PROMPT)) == grpc.StatusCode.PERMISSION_DENIED
        assert await status_of(secured.release("nobody", "r1")) == grpc.StatusCode.PERMISSION_DENIED
        async with secured.stub("nobody") as stub:
            call = stub.RouteStream(iter([router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=PROMPT))]))
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await call.read()
            assert refused_stream(refused.value), refused.value
        # No certificate at all: the TLS handshake is refused (mutual TLS), nothing is routed.
        async with open_channel(secured.router, tls=secured.client(None)) as channel:
            request = router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=PROMPT))
            assert await status_of(router_pb2_grpc.RouterStub(channel).Route(request, timeout=5)) == \
                grpc.StatusCode.UNAVAILABLE
        assert (await secured.stats()).routed == routed
        assert (await secured.route("client-a", PROMPT)).member_id == "engine-0"  # still serving
