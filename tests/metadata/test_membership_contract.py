"""The Membership contract, run unchanged against memory://, etcd:// and redis:// (real servers)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from kvmesh.v1 import common_pb2, metadata_pb2
from tests.metadata.conftest import MetadataClient, member
from tests.metadata.streams import StreamReader

ENGINE = common_pb2.ROLE_ENGINE
CACHENODE = common_pb2.ROLE_CACHENODE


async def register(md: MetadataClient, m: common_pb2.Member, ttl: int = 10) -> metadata_pb2.RegisterResponse:
    return await md.membership.Register(metadata_pb2.RegisterRequest(member=m, ttl_seconds=ttl))


async def test_register_then_list_by_role(md: MetadataClient) -> None:
    a = await register(md, member("e1", ENGINE, 9001, model="llama"))
    b = await register(md, member("c1", CACHENODE, 9002, capacity_bytes=1 << 30))
    assert a.lease_id > 0 and b.lease_id > 0 and a.lease_id != b.lease_id
    assert b.revision > a.revision > 0
    assert a.ttl_seconds >= 10
    assert 1000 <= a.heartbeat_interval_ms <= 5000  # about ttl/3 for a lightly loaded replica
    engines = await md.membership.List(metadata_pb2.ListRequest(role=ENGINE))
    assert [(m.id, m.address, m.model) for m in engines.members] == [("e1", "127.0.0.1:9001", "llama")]
    everyone = await md.membership.List(metadata_pb2.ListRequest())
    assert sorted(m.id for m in everyone.members) == ["c1", "e1"]
    assert everyone.revision >= b.revision


async def test_watch_snapshot_then_join_update_leave_in_revision_order(md: MetadataClient) -> None:
    first = await register(md, member("e1"))
    await register(md, member("c1", CACHENODE))
    watch = StreamReader[metadata_pb2.MembershipEvent](md.membership.Watch(metadata_pb2.WatchRequest(role=ENGINE)))
    try:
        snap = await watch.next()
        assert snap.type == metadata_pb2.SNAPSHOT
        assert [m.id for m in snap.members] == ["e1"]
        assert snap.revision >= first.revision

        second = await register(md, member("e2", port=9002))
        join = await watch.next()
        assert (join.type, [m.id for m in join.members]) == (metadata_pb2.JOIN, ["e2"])
        assert join.revision == second.revision

        # Register again with the same id: replaced under a new lease, seen as UPDATE.
        again = await register(md, member("e1", port=9100))
        update = await watch.next()
        assert update.type == metadata_pb2.UPDATE
        assert update.members[0].address == "127.0.0.1:9100"
        with pytest.raises(grpc.aio.AioRpcError) as info:  # the old lease was revoked
            await md.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=first.lease_id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND

        await md.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=again.lease_id))
        leave = await watch.next()
        assert (leave.type, leave.members[0].id) == (metadata_pb2.LEAVE, "e1")
        assert snap.revision < join.revision < update.revision < leave.revision
        assert await watch.nothing_within(0.3)  # the cache node never shows up in an engine watch
    finally:
        await watch.close()


async def test_expired_lease_leaves_within_ttl_plus_one_second(md: MetadataClient) -> None:
    watch = StreamReader[metadata_pb2.MembershipEvent](md.membership.Watch(metadata_pb2.WatchRequest(role=ENGINE)))
    try:
        assert (await watch.next()).type == metadata_pb2.SNAPSHOT
        reg = await register(md, member("short"), ttl=1)  # etcd rounds very short TTLs up: use what it granted
        assert (await watch.next()).type == metadata_pb2.JOIN
        started = time.monotonic()
        leave = await watch.next(timeout=reg.ttl_seconds + 5)
        took = time.monotonic() - started
        assert (leave.type, leave.members[0].id) == (metadata_pb2.LEAVE, "short")
        assert took <= reg.ttl_seconds + 1.0 + 0.5  # contract: ttl + 1 s (plus slack for a loaded machine)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await md.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=reg.lease_id))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        await watch.close()


async def test_keepalive_renews_and_load_updates_are_rate_limited(md: MetadataClient) -> None:
    reg = await register(md, member("busy"), ttl=2)
    watch = StreamReader[metadata_pb2.MembershipEvent](md.membership.Watch(metadata_pb2.WatchRequest(role=ENGINE)))
    call = md.membership.KeepAlive()
    try:
        assert (await watch.next()).type == metadata_pb2.SNAPSHOT
        started = time.monotonic()
        beats = 0
        while time.monotonic() - started < reg.ttl_seconds + 1.5:  # outlives the TTL only if renewed
            await call.write(metadata_pb2.KeepAliveRequest(
                lease_id=reg.lease_id, load=common_pb2.Load(running_requests=beats)))
            resp = await call.read()
            assert resp.lease_id == reg.lease_id and resp.ttl_seconds == reg.ttl_seconds
            assert resp.heartbeat_interval_ms > 0
            beats += 1
            await asyncio.sleep(0.1)
        listed = await md.membership.List(metadata_pb2.ListRequest(role=ENGINE))
        assert [m.id for m in listed.members] == ["busy"]
        updates = [e for e in watch.drain_now() if e.type == metadata_pb2.UPDATE]
        # Load changed on every one of ~30 heartbeats; at most one UPDATE per second reaches watchers.
        elapsed = time.monotonic() - started
        assert 1 <= len(updates) <= elapsed + 1
        assert beats > 3 * len(updates)
        assert updates[-1].members[0].load.running_requests > 0
        assert not [e for e in watch.drain_now() if e.type == metadata_pb2.LEAVE]
    finally:
        call.cancel()
        await watch.close()


async def test_keepalive_unknown_or_expired_lease_is_not_found(md: MetadataClient) -> None:
    call = md.membership.KeepAlive()
    await call.write(metadata_pb2.KeepAliveRequest(lease_id=123456789))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND

    reg = await register(md, member("gone"), ttl=1)
    await asyncio.sleep(reg.ttl_seconds + 1.2)
    call = md.membership.KeepAlive()
    await call.write(metadata_pb2.KeepAliveRequest(lease_id=reg.lease_id))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert (await md.membership.List(metadata_pb2.ListRequest())).members == []


async def test_watch_resumes_without_loss_or_repeat(md: MetadataClient) -> None:
    base = await register(md, member("e1"))
    changes = [await register(md, member("e2", port=9002))]
    changes.append(await register(md, member("e3", port=9003)))
    await md.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=changes[0].lease_id))
    watch = StreamReader[metadata_pb2.MembershipEvent](
        md.membership.Watch(metadata_pb2.WatchRequest(role=ENGINE, start_revision=base.revision))
    )
    try:
        got = [await watch.next() for _ in range(3)]
        assert [(e.type, e.members[0].id) for e in got] == [
            (metadata_pb2.JOIN, "e2"), (metadata_pb2.JOIN, "e3"), (metadata_pb2.LEAVE, "e2")]
        assert [e.revision for e in got] == sorted({e.revision for e in got})
        assert got[0].revision > base.revision
        assert await watch.nothing_within(0.3)  # nothing repeated, no snapshot
    finally:
        await watch.close()
    # Resuming from the last event seen replays nothing.
    watch = StreamReader[metadata_pb2.MembershipEvent](
        md.membership.Watch(metadata_pb2.WatchRequest(role=ENGINE, start_revision=got[-1].revision))
    )
    try:
        assert await watch.nothing_within(0.3)
        await register(md, member("e4", port=9004))
        assert (await watch.next()).members[0].id == "e4"
    finally:
        await watch.close()


async def test_watch_from_a_revision_not_retained_gets_a_snapshot(md: MetadataClient) -> None:
    await register(md, member("e1"))
    listed = await md.membership.List(metadata_pb2.ListRequest())
    # A revision from the future (e.g. from before a backend lost its data) is not retained either.
    for start in (listed.revision + 1_000_000,):
        watch = StreamReader[metadata_pb2.MembershipEvent](
            md.membership.Watch(metadata_pb2.WatchRequest(role=ENGINE, start_revision=start))
        )
        try:
            snap = await watch.next()
            assert snap.type == metadata_pb2.SNAPSHOT
            assert [m.id for m in snap.members] == ["e1"]
        finally:
            await watch.close()
