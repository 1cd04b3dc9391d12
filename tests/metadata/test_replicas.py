"""Two metadata processes on one etcd (and on one Redis) serve one membership."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import common_pb2
from tests.metadata.conftest import backend_uri, member

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("backend_name", ["etcd", "redis"])
async def test_two_replicas_share_members_and_a_lease_survives_its_replica(
    request: pytest.FixtureRequest, backend_name: str
) -> None:
    async with process_mesh(metadata=2, metadata_backend=backend_uri(request, backend_name)) as mesh:
        await _lease_survives_its_replica(mesh)


async def _lease_survives_its_replica(mesh: MeshHandle) -> None:
    a, b = mesh.metadata_addresses

    seen_on_b: list[MembershipChange] = []
    seen_on_both: list[MembershipChange] = []
    watcher_b = MembershipWatcher([b], common_pb2.ROLE_CACHENODE, on_change=seen_on_b.append)
    watcher_ab = MembershipWatcher([a, b], common_pb2.ROLE_CACHENODE, on_change=seen_on_both.append)
    ttl = 2  # short: the test outlives it twice over (SIGKILL fails over at once, on connection refused)
    session = MemberSession([a, b], member("cache-1", common_pb2.ROLE_CACHENODE), ttl_seconds=ttl)
    for client in (watcher_b, watcher_ab):
        await client.start()
    try:
        await watcher_b.wait_synced(10)
        await watcher_ab.wait_synced(10)
        await session.start()
        lease = await session.wait_registered(10)
        # Registered through A, seen by a watcher on B.
        await eventually(lambda: "cache-1" in watcher_b.members and "cache-1" in watcher_ab.members)

        await mesh.kill("metadata-0")  # SIGKILL: no goodbye; the session and watcher_ab fail over to B
        await eventually(lambda: watcher_ab.reconnects >= 1, timeout=10)
        # Not a wait for a condition: outlive the TTL more than twice over, so that only
        # heartbeats through B can have kept the lease.
        await asyncio.sleep(2 * ttl + 1)
        assert session.lease_id == lease and session.registrations == 1  # same lease, never re-registered
        assert "cache-1" in watcher_b.members and "cache-1" in watcher_ab.members
        assert not [m for c in seen_on_b + seen_on_both for m in c.left]  # no LEAVE, not even briefly
        # watcher_ab resumed on B from its last revision: a replay, not a new snapshot.
        assert [c.snapshot for c in seen_on_both].count(True) == 1

        await session.close()
        await eventually(lambda: "cache-1" not in watcher_b.members and "cache-1" not in watcher_ab.members)
    finally:
        await session.close()
        await watcher_b.close()
        await watcher_ab.close()


async def test_a_session_leaves_a_hung_replica_before_its_lease_lapses(request: pytest.FixtureRequest) -> None:
    """SIGSTOP keeps the replica's connections open: only the session's own deadline notices."""
    async with process_mesh(metadata=2, metadata_backend=backend_uri(request, "etcd")) as mesh:
        await _session_leaves_a_hung_replica(mesh)


async def _session_leaves_a_hung_replica(mesh: MeshHandle) -> None:
    a, b = mesh.metadata_addresses
    replica_a = mesh.member("metadata-0").process
    assert replica_a is not None
    changes: list[MembershipChange] = []
    watcher = MembershipWatcher([b], common_pb2.ROLE_ENGINE, on_change=changes.append)
    # A hung replica is noticed by the session's response deadline (heartbeat interval + 1 s = 2 s
    # at this TTL), which must stay below the TTL: 3 s is the shortest with a second of margin.
    ttl = 3
    session = MemberSession([a, b], member("engine-1"), ttl_seconds=ttl)
    await watcher.start()
    try:
        await session.start()
        lease = await session.wait_registered(10)
        await eventually(lambda: "engine-1" in watcher.members)
        os.kill(replica_a.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(2 * ttl + 1)  # not a wait for a condition: the lease must outlive this
            assert session.lease_id == lease and session.registrations == 1
            assert "engine-1" in watcher.members
            assert not [m for c in changes for m in c.left]
        finally:
            os.kill(replica_a.pid, signal.SIGCONT)
    finally:
        await session.close()
        await watcher.close()
