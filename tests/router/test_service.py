"""The Router gRPC service in process, following a real metadata service's membership."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest

from kvmesh.services.enginesim.events import EventReporter
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import router_pb2
from tests.router.conftest import Mesh

pytestmark = pytest.mark.timeout(60)


def blocks(*ids: int, request_id: str = "", model: str = "") -> router_pb2.RouteRequest:
    return router_pb2.RouteRequest(request_id=request_id, model=model, blocks=router_pb2.BlockIds(ids=list(ids)))


async def _mesh(factory: Callable[..., Any], **kw: object) -> Mesh:
    mesh: Mesh = await factory(**kw)
    return mesh


async def test_no_engine_member_answers_unavailable(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Route(blocks(1, 2))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # Still serving.
    stats = await mesh.stub.Stats(router_pb2.RouterStatsRequest())
    assert stats.members == 0 and stats.policy == "prefix"


async def test_route_follows_joins_and_leaves_from_metadata(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory)
    await mesh.join("e1", port=9001)
    await mesh.join("e2", port=9002)
    await mesh.wait_members(lambda ids: ids == {"e1", "e2"})
    first = await mesh.stub.Route(blocks(1, 2, 3, request_id="q1"))
    assert first.member_id in {"e1", "e2"} and first.request_id == "q1"
    assert first.address == {"e1": "127.0.0.1:9001", "e2": "127.0.0.1:9002"}[first.member_id]
    await mesh.stub.Release(router_pb2.ReleaseRequest(request_id="q1"))
    second = await mesh.stub.Route(blocks(1, 2, 3, 4, request_id="q2"))
    assert second.member_id == first.member_id and second.matched_blocks == 3 and second.total_blocks == 4
    await mesh.leave(first.member_id)
    other = ({"e1", "e2"} - {first.member_id}).pop()
    await mesh.wait_members(lambda ids: ids == {other})
    for i in range(10):
        assert (await mesh.stub.Route(blocks(1, 2, 3, request_id=f"z{i}"))).member_id == other
    stats = await mesh.stub.Stats(router_pb2.RouterStatsRequest())
    assert stats.members == 1 and stats.routed == 12 and stats.inflight == 11


async def test_route_stream_answers_each_request_in_order_with_errors_inline(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory)
    await mesh.join("e1")
    await mesh.wait_members(lambda ids: ids == {"e1"})

    async def requests() -> AsyncIterator[router_pb2.RouteRequest]:
        for i in range(50):
            yield blocks(i, i + 1, request_id=f"s{i}")
        yield router_pb2.RouteRequest(request_id="bad", tokens=router_pb2.TokenIds(ids=[1] * 16 * 70_000))
        yield router_pb2.RouteRequest(request_id="text", text="hello " * 40)

    got = [r async for r in mesh.stub.RouteStream(requests())]
    assert [r.request_id for r in got] == [f"s{i}" for i in range(50)] + ["bad", "text"]
    assert all(r.member_id == "e1" and r.error_code == 0 for r in got[:50])
    assert got[50].member_id == "" and got[50].error_code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "max-prompt-blocks" in got[50].error
    assert got[51].member_id == "e1" and got[51].total_blocks == 240 // 64


async def test_report_events_precise_mode_and_ignored_unknown_member(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory)
    await mesh.join("e1")
    await mesh.join("e2")
    await mesh.wait_members(lambda ids: ids == {"e1", "e2"})

    def stored(parent: int, *ids: int) -> router_pb2.KvEvent:
        return router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=parent, ids=list(ids)))

    async def batches() -> AsyncIterator[router_pb2.KvEventBatch]:
        yield router_pb2.KvEventBatch(member_id="e2", events=[stored(0, 10, 11, 12), stored(12, 13)])
        yield router_pb2.KvEventBatch(
            member_id="e2", events=[router_pb2.KvEvent(removed=router_pb2.BlocksRemoved(ids=[13]))]
        )
        yield router_pb2.KvEventBatch(member_id="nobody", events=[stored(0, 1)])

    resp = await mesh.stub.ReportEvents(batches())
    assert (resp.batches, resp.applied_events, resp.ignored_events) == (3, 3, 1)
    assert "unknown member" in resp.last_ignored_reason
    d = await mesh.stub.Route(blocks(10, 11, 12, 13))
    assert d.member_id == "e2" and d.matched_blocks == 3


async def test_malformed_events_are_invalid_and_change_nothing(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory)
    await mesh.join("e1")
    await mesh.wait_members(lambda ids: ids == {"e1"})

    async def bad() -> AsyncIterator[router_pb2.KvEventBatch]:
        yield router_pb2.KvEventBatch(
            member_id="e1",
            events=[router_pb2.KvEvent(stored=router_pb2.BlocksStored(ids=[5])), router_pb2.KvEvent()],
        )

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.ReportEvents(bad())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert 5 not in mesh.service.core.tree

    async def anonymous() -> AsyncIterator[router_pb2.KvEventBatch]:
        yield router_pb2.KvEventBatch(events=[])

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.ReportEvents(anonymous())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # Still serving.
    assert (await mesh.stub.Route(blocks(5))).member_id == "e1"


async def test_bad_route_input_gets_a_status(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory, max_prompt_blocks=100)
    await mesh.join("e1")
    await mesh.wait_members(lambda ids: ids == {"e1"})
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Route(blocks(*range(101)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await mesh.stub.Release(router_pb2.ReleaseRequest())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    empty = await mesh.stub.Route(router_pb2.RouteRequest(request_id="e"))
    assert empty.member_id == "e1" and empty.total_blocks == 0
    tokens = await mesh.stub.Route(router_pb2.RouteRequest(tokens=router_pb2.TokenIds(ids=list(range(40)))))
    assert tokens.total_blocks == 2 and tokens.request_id


async def test_model_routing_and_reported_load(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory, policy="least-load")
    await mesh.join("big", model="llama", running=50)
    await mesh.join("small", model="llama", running=0)
    await mesh.join("q", model="qwen")
    await mesh.wait_members(lambda ids: ids == {"big", "small", "q"})
    for i in range(5):
        d = await mesh.stub.Route(blocks(i, request_id=f"l{i}", model="llama"))
        assert d.member_id == "small"
    d = await mesh.stub.Route(blocks(1, model="qwen"))
    assert d.member_id == "q" and d.policy == "least-load"


async def test_sweeper_expires_approximate_blocks_and_stale_requests(mesh_factory: Callable[..., Any]) -> None:
    mesh = await _mesh(mesh_factory, approx_ttl_seconds=0.3, sweep_interval_seconds=0.1, inflight_timeout_seconds=0.3)
    await mesh.join("e1")
    await mesh.wait_members(lambda ids: ids == {"e1"})
    await mesh.stub.Route(blocks(1, 2, 3, request_id="never-released"))
    stats = await mesh.stub.Stats(router_pb2.RouterStatsRequest())
    assert stats.tree_nodes == 3 and stats.inflight == 1

    async def swept() -> bool:
        stats = await mesh.stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.tree_nodes == 0 and stats.inflight == 0, stats
        return True

    await eventually(swept, timeout=5, interval=0.05, what="the sweeper to drop the request and its blocks")
    assert mesh.service.core.inflight("e1") == 0


async def test_engine_events_sent_before_the_router_knew_it_are_said_again(mesh_factory: Callable[..., Any]) -> None:
    # The engine's first events race the router's membership watch: the router ignores them
    # (unknown member), and the reporter's late resync on the very first stream repairs that.
    mesh = await _mesh(mesh_factory)
    cache: list[list[int]] = []
    reporter = EventReporter("late-1", lambda: [mesh.router_address], lambda: cache, late_resync_s=1.0)
    try:
        cache.append([31, 32, 33])
        reporter.stored([31, 32, 33])
        await eventually(lambda: mesh.service.core.events_ignored >= 1, timeout=10, interval=0.01,
                         what="the router to ignore the unknown member's events")
        await mesh.join("late-1")
        await mesh.wait_members(lambda ids: ids == {"late-1"})
        await eventually(lambda: mesh.service.core.events_applied >= 1, timeout=10, interval=0.05,
                         what="the late resync to reach the router")
        decision = await mesh.stub.Route(blocks(31, 32, 33, 34))
        assert decision.member_id == "late-1" and decision.matched_blocks == 3
    finally:
        await reporter.close()
