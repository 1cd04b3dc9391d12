"""Thousands of concurrent routes while engines join and leave through a real metadata service.

The check is made where it matters, inside the router: every decision is compared with the
set of members whose LEAVE the router has already applied. No decision may name one.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kvmesh.services.router.core import Decision
from kvmesh.v1 import router_pb2
from tests.router.conftest import Mesh

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("grace", [0.0, 30.0])
async def test_no_decision_names_a_pod_after_its_leave(mesh_factory: Callable[..., Any], grace: float) -> None:
    # With a rejoin grace window a pod that left is kept (tree and all) but is no candidate
    # while live pods exist, which they always do here.
    mesh: Mesh = await mesh_factory(policy="prefix", rejoin_grace_seconds=grace)
    core = mesh.service.core
    gone: set[str] = set()
    violations: list[str] = []
    decisions: list[str] = []
    route, leave = core.route, core.leave

    def checked_route(*args: Any, **kwargs: Any) -> Decision:
        d = route(*args, **kwargs)
        if d.member_id in gone or d.member_id not in core.pods.by_id:
            violations.append(d.member_id)
        decisions.append(d.member_id)
        return d

    def tracked_leave(member_id: str) -> None:
        leave(member_id)
        gone.add(member_id)

    core.route = checked_route  # type: ignore[method-assign]
    core.leave = tracked_leave  # type: ignore[method-assign]

    live: list[str] = []
    for i in range(4):
        await mesh.join(f"e{i}", port=9000 + i)
        live.append(f"e{i}")
    await mesh.wait_members(lambda ids: ids == set(live))

    stop = asyncio.Event()
    churned = 0

    async def churn() -> None:
        nonlocal churned
        n = len(live)
        rng = random.Random(1)
        while not stop.is_set():
            if len(live) > 3 and rng.random() < 0.5:
                await mesh.leave(live.pop(rng.randrange(len(live))))
            else:
                await mesh.join(f"e{n}", port=9000 + n)
                live.append(f"e{n}")
                n += 1
            churned += 1
            await asyncio.sleep(0.01)  # pacing the churn, not waiting for anything

    rng = random.Random(2)
    prefixes = [[rng.getrandbits(63) for _ in range(8)] for _ in range(20)]
    errors: list[str] = []

    async def one(i: int) -> None:
        ids = [*rng.choice(prefixes), *(rng.getrandbits(63) for _ in range(rng.randrange(0, 8)))]
        try:
            resp = await mesh.stub.Route(
                router_pb2.RouteRequest(request_id=f"c{i}", blocks=router_pb2.BlockIds(ids=ids))
            )
            assert resp.member_id
            if i % 2:
                await mesh.stub.Release(router_pb2.ReleaseRequest(request_id=f"c{i}"))
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{exc.code()}: {exc.details()}")

    churner = asyncio.create_task(churn())
    try:
        for start in range(0, 3000, 250):
            await asyncio.gather(*(one(i) for i in range(start, start + 250)))
    finally:
        stop.set()
        await churner
    assert not errors, errors[:5]
    assert not violations, violations[:5]
    assert len(decisions) == 3000
    assert churned >= 5 and len(gone) >= 2
    # Pods that left hold nothing in the tree (or, within the grace window, are only kept).
    for member_id in gone:
        pod = core.pods.get(member_id)
        assert pod is None if not grace else pod is not None and pod.departed_at is not None
    assert set(core.pods.by_id) - set(core.pods.departed) == set(live) or await _eventually(mesh, live)


async def _eventually(mesh: Mesh, live: list[str]) -> bool:
    await mesh.wait_members(lambda ids: ids == set(live))
    return True
