"""Backend down: UNAVAILABLE, and the service (and its clients) recover when it returns."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.testing.ports import free_port
from kvmesh.testing.servers import ServerHandle, start_etcd, start_redis
from kvmesh.v1 import common_pb2, metadata_pb2
from tests.metadata.conftest import member, start_metadata, stop_metadata

pytestmark = pytest.mark.integration

Starter = Callable[[Path, int], ServerHandle]
SERVERS: dict[str, tuple[Starter, str]] = {
    "redis": (start_redis, "redis://127.0.0.1:{port}/0?sweep_ms=50&timeout=1"),
    "etcd": (start_etcd, "etcd://127.0.0.1:{port}?timeout=1"),
}


async def eventually_ok(call: Callable[[], object], timeout: float = 20.0) -> object:
    end = time.monotonic() + timeout
    while True:
        try:
            return await call()  # type: ignore[misc]
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            if time.monotonic() > end:
                raise
            await asyncio.sleep(0.2)


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
        assert put.revision > 0  # type: ignore[attr-defined]
        # Clients recover by themselves: Redis lost its data (no persistence), so the session
        # registers again and the watcher resyncs; etcd kept it, so the same lease goes on.
        end = time.monotonic() + 20
        while not any(m.id == "steady" for m in (await md.membership.List(metadata_pb2.ListRequest())).members):
            assert time.monotonic() < end, "member did not come back"
            await asyncio.sleep(0.2)
        deadline = time.monotonic() + 20
        while "steady" not in watcher.members or watcher.reconnects == 0:
            assert time.monotonic() < deadline, "watcher did not recover"
            await asyncio.sleep(0.1)
    finally:
        await session.close()
        await watcher.close()
        await md.channel.close()
        await stop_metadata(runtime)
        await asyncio.to_thread(server.stop)
