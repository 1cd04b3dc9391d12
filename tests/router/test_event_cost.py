"""Issue 13, item 1 (scaled down): a KV event costs in proportion to its own size, and a storm of
events never holds routing. A long stored run is kept as a line of short nodes, so small events
that branch off inside it or evict its tail touch a few dozen ids, not the run; a big
`ReportEvents` batch is applied in slices with routes answered in between."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from kvmesh.services.router.core import KvEvent, Removed, RouterCore, Stored, event_slices
from kvmesh.services.router.tree import MAX_RUN, PrefixTree
from kvmesh.v1 import router_pb2
from tests.router.conftest import Mesh
from tests.router.helpers import joined, member, settings

RUN = 200_000  # the issue had 300k-1M; the shape is the same


def longest_label(tree: PrefixTree) -> int:
    return max(len(node.ids) for node in tree._walk())


def test_small_events_inside_a_long_run_touch_short_nodes() -> None:
    router = RouterCore("prefix", settings(max_tree_blocks=RUN + 10_000))
    router.update_pods(joined(member("a")))
    run = list(range(1, RUN + 1))
    assert router.apply_events("a", [Stored(0, run)]).applied == 1
    assert longest_label(router.tree) <= MAX_RUN
    # 800 small events branching off all along the run, then removals inside it.
    for i in range(800):
        parent = run[(i * 997) % RUN]
        assert router.apply_events("a", [Stored(parent, [10_000_000 + i])]).applied == 1
    router.apply_events("a", [Removed([*run[5_000:5_010], *run[-3:]])])
    assert longest_label(router.tree) <= MAX_RUN
    assert router.tree.pod_blocks(router.pods.get("a").slot) == RUN + 800 - 13  # type: ignore[union-attr]
    # Evicting a few blocks trims one short leaf, never re-copies the run.
    router.tree.max_blocks = len(router.tree) - 5
    router.tree._bound()
    assert len(router.tree) == router.tree.max_blocks
    assert router.route(run[:100]).matched_blocks == 100


def test_event_slices_keep_order_and_chain_long_runs() -> None:
    events: list[KvEvent] = [Stored(0, list(range(1, 10_001))), Removed([5]), Stored(10_000, [20_000])]
    pieces = list(event_slices(events, 4096))
    assert all(sum(len(e.ids) for e in p if isinstance(e, Stored | Removed)) <= 4096 for p in pieces)
    flat = [e for p in pieces for e in p]
    stored = [e for e in flat if isinstance(e, Stored)]
    assert stored[0].parent_id == 0 and stored[1].parent_id == 4096 and stored[2].parent_id == 8192
    a = RouterCore("prefix", settings())
    b = RouterCore("prefix", settings())
    for r in (a, b):
        r.update_pods(joined(member("x")))
    a.apply_events("x", events)
    for p in pieces:
        b.apply_events("x", p)
    assert sorted(a.tree.block_ids()) == sorted(b.tree.block_ids())


@pytest.fixture
async def mesh(mesh_factory: Callable[..., Any]) -> AsyncIterator[Mesh]:
    m: Mesh = await mesh_factory(max_tree_blocks=RUN + 100_000, event_slice_blocks=256)
    await m.join("a")
    await m.join("b", port=9001)
    await m.wait_members(lambda ids: ids == {"a", "b"})
    yield m


async def test_routes_are_answered_while_a_storm_of_events_is_applied(mesh: Mesh) -> None:
    run = list(range(1, RUN + 1))

    def batch(events: list[router_pb2.KvEvent]) -> router_pb2.KvEventBatch:
        return router_pb2.KvEventBatch(member_id="a", events=events)

    # Built before the clock starts: the client shares this event loop with the router.
    batches = [
        batch([router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=0, ids=run))]),
        batch([router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=run[(i * 37) % RUN], ids=[50_000_000 + i]))
               for i in range(20_000)]),
    ]

    async def storm() -> AsyncIterator[router_pb2.KvEventBatch]:
        for b in batches:
            yield b

    done = asyncio.Event()
    routed_during = 0

    async def routes() -> None:
        nonlocal routed_during
        while not done.is_set():
            r = await mesh.stub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=run[:64])))
            await mesh.stub.Release(router_pb2.ReleaseRequest(request_id=r.request_id))
            if not done.is_set():
                routed_during += 1

    router_task = asyncio.create_task(routes())
    try:
        resp = await mesh.stub.ReportEvents(storm(), timeout=120)
    finally:
        done.set()
        await router_task
    assert resp.batches == 2 and resp.ignored_events == 0
    assert resp.applied_events >= 20_001
    assert routed_during >= 5, "routing waited behind the whole storm"
    r = await mesh.stub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=run[:1000])))
    assert (r.member_id, r.matched_blocks) == ("a", 1000)
