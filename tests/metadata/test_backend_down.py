"""Backend down: UNAVAILABLE, and the service (and its clients) recover when it returns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.tools.testing.mesh import MeshHandle, local_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.servers import ServerHandle, start_etcd, start_redis
from kvmesh.v1 import common_pb2, metadata_pb2
from tests.metadata.conftest import member

pytestmark = pytest.mark.integration
T = TypeVar("T")

Starter = Callable[[Path, int], ServerHandle]
SERVERS: dict[str, tuple[Starter, str]] = {
    "redis": (start_redis, "redis://127.0.0.1:{port}/0?sweep_ms=50&timeout=1"),
    "etcd": (start_etcd, "etcd://127.0.0.1:{port}?timeout=1"),
}


class _NotYet(Exception):
    """UNAVAILABLE while the backend is down."""


async def eventually_ok(call: Callable[[], Awaitable[T]], timeout: float = 20.0) -> T:
    """The call's reply once the backend is back: UNAVAILABLE means not yet, other codes fail."""
    async def attempt() -> T:
        try:
            return await call()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            raise _NotYet(exc) from exc

    return await eventually(attempt, timeout=timeout, interval=0.2, what="the backend to answer", retry_on=_NotYet)


@pytest.mark.parametrize("name", sorted(SERVERS))
async def test_backend_down_is_unavailable_and_recovers(tmp_path: Path, name: str) -> None:
    start, template = SERVERS[name]
    port = free_port()
    servers = [await asyncio.to_thread(start, tmp_path, port)]
    try:
        async with local_mesh(metadata_backend=template.format(port=port)) as mesh:
            await _down_and_back(mesh, lambda: start(tmp_path, port), servers)
    finally:
        for server in servers:
            await asyncio.to_thread(server.stop)


async def _down_and_back(mesh: MeshHandle, start: Callable[[], ServerHandle], servers: list[ServerHandle]) -> None:
    """The backend (`servers[0]`) stops under a running service and comes back on the same port;
    the restarted server joins `servers` for the caller to stop."""
    membership, kv = mesh.membership(), mesh.kv()
    changes: list[MembershipChange] = []
    watcher = MembershipWatcher([mesh.metadata_address], common_pb2.ROLE_ENGINE, on_change=changes.append)
    session = MemberSession([mesh.metadata_address], member("steady"), ttl_seconds=3)
    try:
        await watcher.start()
        await session.start()
        await session.wait_registered(10)
        await watcher.wait_synced(10)

        await asyncio.to_thread(servers[0].stop)
        reg = membership.Register(metadata_pb2.RegisterRequest(member=member("new"), ttl_seconds=5))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reg
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kv.Get(metadata_pb2.GetKeyRequest(key="k"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        # Not a wait for a condition: the backend stays down this long so that the session's
        # heartbeats and the watch really fail meanwhile.
        await asyncio.sleep(1.0)

        servers.append(await asyncio.to_thread(start))  # same port (and etcd: same data)
        listed = await eventually_ok(lambda: membership.List(metadata_pb2.ListRequest()))
        assert isinstance(listed, metadata_pb2.ListResponse)
        put = await eventually_ok(lambda: kv.Put(metadata_pb2.PutKeyRequest(key="k", value=b"v")))
        assert put.revision > 0
        # Clients recover by themselves: Redis lost its data (no persistence), so the session
        # registers again and the watcher resyncs; etcd kept it, so the same lease goes on.
        async def member_back() -> bool:
            return any(m.id == "steady" for m in (await membership.List(metadata_pb2.ListRequest())).members)

        await eventually(member_back, timeout=20, interval=0.2, what="the member to come back")
        await eventually(lambda: "steady" in watcher.members and watcher.reconnects > 0, timeout=20,
                         what="the watcher to recover")
    finally:
        await session.close()
        await watcher.close()
