"""End to end through real processes: `kvmesh metadata`, `kvmesh router`, `kvmesh route`.

Engine members are registered from the test process with MemberSession (real leases,
real KeepAlive streams), so the router learns them only through Watch(ROLE_ENGINE).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from kvmesh.membership import MemberSession
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import router_pb2, router_pb2_grpc
from tests.router.helpers import member

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


async def wait_members(stub: router_pb2_grpc.RouterStub, count: int, timeout: float = 15.0) -> None:
    """Polls the router's Stats until it counts `count` engine members."""
    async def check() -> bool:
        stats = await stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.members == count, f"router sees {stats.members} members, expected {count}"
        return True

    await eventually(check, timeout=timeout, interval=0.05, what=f"{count} router members")


async def run_cli(kvmesh: Callable[..., KvmeshProcess], *args: str) -> tuple[int, str]:
    proc = kvmesh(*args, ready=False)
    code = await asyncio.to_thread(proc.wait_exit, 30.0)
    return code, proc.output


async def test_mesh_routes_learns_and_survives_a_metadata_restart(kvmesh: Callable[..., Any]) -> None:
    # A pinned metadata port: the restarted process comes back where the router and engines dial.
    async with process_mesh(metadata_listen=f"127.0.0.1:{free_port()}", routers=1,
                            router_settings={"policy": "prefix"}) as mesh:
        await _routes_learns_and_survives(mesh, kvmesh)
        router = mesh.member("router-0")
        await mesh.stop("router-0")
        assert router.process is not None and router.process.returncode == 0


async def _routes_learns_and_survives(mesh: MeshHandle, kvmesh: Callable[..., Any]) -> None:
    md, router_addr = mesh.metadata_address, mesh.router_address
    stub = mesh.router_stub()
    sessions = [MemberSession([md], member(f"eng-{i}", model="m", port=9100 + i), ttl_seconds=2) for i in range(3)]
    try:
        # No engine yet: UNAVAILABLE.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=[1])))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        for s in sessions:
            await s.start()
            await s.wait_registered(10)
        await wait_members(stub, 3)

        code, out = await run_cli(
            kvmesh, "route", "--router", router_addr, "--model", "m", "--tokens", ",".join(map(str, range(64)))
        )
        assert code == 0, out
        assert "matched=0/4" in out and "member=eng-" in out
        code, out = await run_cli(
            kvmesh,
            "route",
            "--router",
            router_addr,
            "--json",
            "--model",
            "m",
            "--tokens",
            ",".join(map(str, range(80))),
        )
        assert code == 0, out
        decision = json.loads(out.strip().splitlines()[-1])
        assert decision["matched_blocks"] == 4 and decision["total_blocks"] == 5
        chosen = decision["member_id"]

        # The chosen engine leaves: never routed to again.
        leaving = next(s for s in sessions if s.member.id == chosen)
        await leaving.close(deregister=True)
        sessions.remove(leaving)
        await wait_members(stub, 2)
        for _i in range(20):
            resp = await stub.Route(router_pb2.RouteRequest(model="m", tokens=router_pb2.TokenIds(ids=list(range(80)))))
            assert resp.member_id != chosen

        # Metadata dies and comes back (empty memory backend): engines re-register, the
        # router's watch reconnects and resumes; an engine that died meanwhile is gone.
        await mesh.kill("metadata")
        dead = sessions.pop()
        await dead.close(deregister=False)
        await mesh.restart("metadata")
        await wait_members(stub, 1, timeout=30)
        resp = await stub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=[7, 8])))
        assert resp.member_id == sessions[0].member.id

        stats = await stub.Stats(router_pb2.RouterStatsRequest())
        assert stats.policy == "prefix" and stats.routed >= 23
    finally:
        for s in sessions:
            await s.close()


async def test_router_registers_itself_as_a_router_member() -> None:
    async with process_mesh(metadata_backend="memory://") as mesh:
        router = await mesh.add("router", "r-1")
        listed = await mesh.wait_members("router", 1, timeout=5)
        assert [(m.id, m.address) for m in listed] == [("r-1", router.address)]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--policy", "nope"), "unknown policy"),
        (("--imbalance-abs", "-1"), "--imbalance-abs"),
        (("--cache-threshold", "1.5"), "--cache-threshold"),
        (("--max-tree-blocks", "0"), "--max-tree-blocks"),
        (("--block-size", "abc"), "--block-size"),
    ],
)
async def test_bad_flags_exit_2_with_a_message(
    kvmesh: Callable[..., Any], flags: tuple[str, ...], message: str
) -> None:
    code, out = await run_cli(kvmesh, "router", "--listen", "127.0.0.1:0", *flags)
    assert code == 2, out
    assert message in out


async def test_watch_fails_over_between_metadata_replicas_on_etcd(etcd: Any) -> None:
    """Two metadata replicas over one etcd: the replica the router watches is SIGKILLed; the
    router's watch moves to the other one and keeps following joins and leaves."""
    backend = f"etcd://{etcd.address}?prefix=/router-failover-{free_port()}"
    async with process_mesh(metadata=2, metadata_backend=backend, routers=1,
                            router_settings={"register_self": False}) as mesh:
        await _watch_fails_over(mesh)


async def _watch_fails_over(mesh: MeshHandle) -> None:
    addresses = mesh.metadata_addresses
    stub = mesh.router_stub()
    sessions = [MemberSession(addresses[::-1], member(f"e{i}", port=9200 + i), ttl_seconds=3) for i in range(2)]
    try:
        for s in sessions:
            await s.start()
            await s.wait_registered(10)
        await wait_members(stub, 2)
        await mesh.kill("metadata-0")  # the router watches the first address first
        late = MemberSession(addresses[1:], member("e-late", port=9300), ttl_seconds=3)
        sessions.append(late)
        await late.start()
        await late.wait_registered(10)
        await wait_members(stub, 3, timeout=30)
        gone = sessions.pop(0)
        await gone.close(deregister=True)
        await wait_members(stub, 2, timeout=30)
        for _ in range(10):
            resp = await stub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=[1, 2])))
            assert resp.member_id in {"e1", "e-late"}
    finally:
        for s in sessions:
            await s.close()


async def test_prometheus_metrics_follow_the_router() -> None:
    port = free_port()
    async with process_mesh(metadata_backend="memory://", routers=1, router_settings={"metrics_port": port}) as mesh:
        await _metrics_follow(mesh, port)


async def _metrics_follow(mesh: MeshHandle, port: int) -> None:
    import urllib.request

    stub = mesh.router_stub()
    session = MemberSession([mesh.metadata_address], member("m-1"), ttl_seconds=3)
    try:
        await session.start()
        await session.wait_registered(10)
        await wait_members(stub, 1)
        for i in range(3):
            await stub.Route(router_pb2.RouteRequest(request_id=f"q{i}", blocks=router_pb2.BlockIds(ids=[1, 2, i])))

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                return str(resp.read().decode())

        text = await asyncio.to_thread(scrape)
        lines = {line.split("{")[0]: line for line in text.splitlines() if line.startswith("kvmesh_router")}
        assert lines["kvmesh_router_routed_total"].endswith(" 3.0"), lines
        assert lines["kvmesh_router_members"].endswith(" 1.0")
        assert lines["kvmesh_router_tree_blocks"].endswith(" 5.0")  # 1, 2 then 0 | 1 | 2
        assert lines["kvmesh_router_inflight"].endswith(" 3.0")
    finally:
        await session.close()
