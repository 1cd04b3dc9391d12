"""The membership clients (MemberSession, MembershipWatcher) across metadata restarts."""

from __future__ import annotations

import time

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.tools.testing.mesh import local_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import common_pb2, metadata_pb2
from tests.metadata.conftest import member


def pinned() -> str:
    """A fixed address, so a restarted metadata service comes back where its clients dial."""
    return f"127.0.0.1:{free_port()}"


async def test_watcher_reports_what_changed_while_it_was_disconnected() -> None:
    async with local_mesh(metadata_listen=pinned(), grace_seconds=0.2) as mesh:
        address = mesh.metadata_address
        changes: list[MembershipChange] = []
        watcher = MembershipWatcher([address], common_pb2.ROLE_ENGINE, on_change=changes.append)
        stay = MemberSession([address], member("stays", port=9001), ttl_seconds=2)
        goes = MemberSession([address], member("goes", port=9002), ttl_seconds=2)
        try:
            await watcher.start()
            for s in (stay, goes):
                await s.start()
                await s.wait_registered(10)
            await eventually(lambda: set(watcher.members) == {"stays", "goes"})
            await goes.close(deregister=False)  # dies with the metadata service: it never comes back
            await mesh.stop("metadata")
            await mesh.restart("metadata")  # an empty memory:// store: only "stays" registers again
            await eventually(lambda: set(watcher.members) == {"stays"}, timeout=15)
            # The diffs delivered add up to the current set: a consumer that only applies them
            # (like the router's update_pod_set) ends with exactly the live members.
            reconstructed: set[str] = set()
            for change in changes:
                reconstructed |= {m.id for m in change.joined}
                reconstructed -= {m.id for m in change.left}
            assert reconstructed == set(watcher.members) == {"stays"}
            after_restart = [c for c in changes if c.snapshot][1:]
            assert after_restart, "the watcher resynced with a snapshot"
            assert any(m.id == "goes" for c in after_restart for m in c.left)
            assert stay.registrations >= 2  # its lease was gone with the old store: NOT_FOUND → registered again
        finally:
            await stay.close()
            await goes.close()
            await watcher.close()


async def test_session_registers_again_when_its_lease_is_revoked_elsewhere() -> None:
    async with local_mesh(grace_seconds=0.2) as mesh:
        session = MemberSession([mesh.metadata_address], member("phoenix"), ttl_seconds=2)
        try:
            await session.start()
            lease = await session.wait_registered(10)
            await mesh.membership().Deregister(metadata_pb2.DeregisterRequest(lease_id=lease))
            await eventually(lambda: session.lease_id not in (0, lease), timeout=10)
            assert session.registrations == 2
        finally:
            await session.close()


async def test_draining_replica_ends_watch_streams_at_once() -> None:
    """Watchers move to another replica right away instead of waiting out the grace period."""
    async with local_mesh(metadata_backend="memory://", metadata_settings={"grace_seconds": 30}) as mesh:
        watcher = MembershipWatcher([mesh.metadata_address], common_pb2.ROLE_ENGINE)
        try:
            await watcher.start()
            await watcher.wait_synced(10)
            started = time.monotonic()
            await mesh.stop("metadata")
            assert time.monotonic() - started < 5  # not the 30 s grace
            await eventually(lambda: watcher.reconnects >= 1, timeout=5)
        finally:
            await watcher.close()
