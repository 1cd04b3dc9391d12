"""Membership snapshots larger than a message: List pages and Watch SNAPSHOT pages, against a
real metadata process whose messages are capped well below the whole member set, and a
router that (re)starts while those members are registered."""

from __future__ import annotations

import asyncio

from kvmesh.membership import MembershipWatcher
from kvmesh.membership.listing import list_members
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import common_pb2, metadata_pb2, router_pb2

MEMBERS = 300
PAGE = 64 * 1024


def engine(i: int) -> common_pb2.Member:
    labels = {f"label{j}": f"{i}-{j}-" + "x" * 80 for j in range(10)}  # ~1.1 KB a member, ~330 KB in all
    return common_pb2.Member(id=f"e{i:04d}", role=common_pb2.ROLE_ENGINE, address=f"127.0.0.1:{20000 + i}",
                             model="m", labels=labels)


async def test_list_and_watch_snapshots_come_in_pages_that_fit_a_message() -> None:
    # Messages are capped at 256 KiB: the whole set (~330 KB) in one message would fail.
    settings = {"max_message_bytes": 256 * 1024, "snapshot_page_bytes": PAGE}
    async with process_mesh(metadata=1, metadata_settings=settings, routers=1,
                            router_settings={"register_self": False}) as mesh:
        stub = mesh.membership()
        await asyncio.gather(*(stub.Register(metadata_pb2.RegisterRequest(member=engine(i), ttl_seconds=120))
                               for i in range(MEMBERS)))
        first = await stub.List(metadata_pb2.ListRequest(role=common_pb2.ROLE_ENGINE))
        assert first.next_page_token and 0 < len(first.members) < MEMBERS
        assert first.ByteSize() <= PAGE + 4096
        members, _ = await list_members(stub, common_pb2.ROLE_ENGINE, timeout=10)
        assert sorted(m.id for m in members) == [f"e{i:04d}" for i in range(MEMBERS)]

        pages: list[metadata_pb2.MembershipEvent] = []
        async for event in stub.Watch(metadata_pb2.WatchRequest(role=common_pb2.ROLE_ENGINE), timeout=10):
            pages.append(event)
            if not event.more:
                break
        assert len(pages) >= 4 and {p.type for p in pages} == {metadata_pb2.SNAPSHOT}
        assert len({p.revision for p in pages}) == 1 and [p.more for p in pages][-1] is False
        assert sum(len(p.members) for p in pages) == MEMBERS

        watcher = MembershipWatcher(mesh.metadata_addresses, common_pb2.ROLE_ENGINE)
        await watcher.start()
        try:
            await watcher.wait_synced(10)
            assert len(watcher.members) == MEMBERS  # assembled from every page before it was applied
        finally:
            await watcher.close()

        # A router started now (or restarted) learns every member.
        router = mesh.of_role("router")[0].name
        await mesh.stop(router)
        await mesh.restart(router)

        async def router_knows_all() -> bool:
            stats = await mesh.router_stub().Stats(router_pb2.RouterStatsRequest(), timeout=5)
            return stats.members == MEMBERS

        await eventually(router_knows_all, timeout=20, what="the router to learn every member")


async def test_metadata_range_answers_in_pages_that_fit_a_message() -> None:
    settings = {"max_message_bytes": 256 * 1024, "snapshot_page_bytes": PAGE}
    async with process_mesh(metadata=1, metadata_settings=settings) as mesh:
        kv = mesh.kv()
        await asyncio.gather(*(kv.Put(metadata_pb2.PutKeyRequest(key=f"p/{i:03d}", value=b"v" * 20_000))
                               for i in range(100)))  # ~2 MB in all
        keys: list[str] = []
        start, pages = "", 0
        while True:
            reply = await kv.Range(metadata_pb2.RangeRequest(prefix="p/", start_after=start), timeout=10)
            assert reply.ByteSize() <= PAGE + 32 * 1024
            keys += [k.key for k in reply.kvs]
            pages += 1
            if not reply.more:
                break
            start = reply.kvs[-1].key
        assert keys == [f"p/{i:03d}" for i in range(100)] and pages >= 10
        limited = await kv.Range(metadata_pb2.RangeRequest(prefix="p/", limit=2, start_after="p/050"), timeout=10)
        assert [k.key for k in limited.kvs] == ["p/051", "p/052"] and not limited.more
