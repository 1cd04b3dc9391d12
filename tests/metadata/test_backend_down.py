"""Backend down: UNAVAILABLE, and the service (and its clients) recover when it returns."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.servers import ServerHandle, start_etcd, start_redis
from kvmesh.v1 import common_pb2, metadata_pb2
from tests.metadata.conftest import member, start_metadata, stop_metadata

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
    server = await asyncio.to_thread(start, tmp_path, port)
    runtime, md = await start_metadata(template.format(port=port))
    changes: list[MembershipChange] = []
    watcher = MembershipWatcher([md.address], common_pb2.ROLE_ENGINE, on_change=changes.append)
    session = MemberSession([md.address], member("steady"), ttl_seconds=3)
    try:
        await watcher.start()
        await session.start()
        await session.wait_registered(10)
        await watcher.wait_synced(10)

        await asyncio.to_thread(server.stop)
        reg = md.membership.Register(metadata_pb2.RegisterRequest(member=member("new"), ttl_seconds=5))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await reg
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await md.kv.Get(metadata_pb2.GetKeyRequest(key="k"))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        await asyncio.sleep(1.0)  # the session's heartbeats and the watch fail meanwhile

        server = await asyncio.to_thread(start, tmp_path, port)  # same port (and etcd: same data)
        listed = await eventually_ok(lambda: md.membership.List(metadata_pb2.ListRequest()))
        assert isinstance(listed, metadata_pb2.ListResponse)
        put = await eventually_ok(lambda: md.kv.Put(metadata_pb2.PutKeyRequest(key="k", value=b"v")))
        assert put.revision > 0
        # Clients recover by themselves: Redis lost its data (no persistence), so the session
        # registers again and the watcher resyncs; etcd kept it, so the same lease goes on.
        async def member_back() -> bool:
            return any(m.id == "steady" for m in (await md.membership.List(metadata_pb2.ListRequest())).members)

        await eventually(member_back, timeout=20, interval=0.2, what="the member to come back")
        await eventually(lambda: "steady" in watcher.members and watcher.reconnects > 0, timeout=20,
                         what="the watcher to recover")
    finally:
        await session.close()
        await watcher.close()
        await md.channel.close()
        await stop_metadata(runtime)
        await asyncio.to_thread(server.stop)
