"""`kvmesh metadata` as a real process, with the membership clients other services use."""

from __future__ import annotations

import time

import pytest

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import common_pb2
from tests.metadata.conftest import member

pytestmark = pytest.mark.integration


async def test_session_and_watcher_through_a_metadata_process() -> None:
    async with process_mesh(metadata_backend="memory://") as mesh:
        address = mesh.metadata_address
        changes: list[MembershipChange] = []
        watcher = MembershipWatcher([address], common_pb2.ROLE_ENGINE, on_change=changes.append)
        session = MemberSession([address], member("engine-a"), ttl_seconds=3)
        await watcher.start()
        try:
            await watcher.wait_synced(10)
            await session.start()
            await session.wait_registered(10)
            await eventually(lambda: "engine-a" in watcher.members)
            assert any(m.id == "engine-a" for c in changes for m in c.joined)
            await session.close()  # deregisters: LEAVE at once, not after the TTL
            started = time.monotonic()
            await eventually(lambda: "engine-a" not in watcher.members, timeout=2.0)
            assert time.monotonic() - started < 2.0
        finally:
            await session.close()
            await watcher.close()


async def test_members_come_back_after_a_metadata_restart() -> None:
    """memory:// loses everything on restart: sessions re-register, watchers resync from a snapshot."""
    # A pinned port: the restarted process comes back where the clients dial.
    async with process_mesh(metadata_backend="memory://", metadata_listen=f"127.0.0.1:{free_port()}") as mesh:
        address = mesh.metadata_address
        changes: list[MembershipChange] = []
        watcher = MembershipWatcher([address], common_pb2.ROLE_ENGINE, on_change=changes.append)
        session = MemberSession([address], member("engine-b"), ttl_seconds=2)
        await watcher.start()
        await session.start()
        try:
            await session.wait_registered(10)
            await eventually(lambda: "engine-b" in watcher.members)
            old_lease = session.lease_id
            await mesh.kill("metadata")
            await mesh.restart("metadata")
            await eventually(lambda: session.registrations >= 2 and session.lease_id not in (0, old_lease),
                             timeout=15)
            # The watcher resumed from an old revision the new process never had: it got a SNAPSHOT
            # (first without the member, or with it once it registered again), then the member.
            await eventually(lambda: any(c.snapshot for c in changes[1:]), timeout=15)
            await eventually(lambda: "engine-b" in watcher.members, timeout=15)
            assert watcher.reconnects >= 1
            assert watcher.members["engine-b"].address == "127.0.0.1:9000"
        finally:
            await session.close()
            await watcher.close()
