"""The Metadata KV contract, run unchanged against memory://, etcd:// and redis:// (real servers)."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvmesh.v1 import metadata_pb2
from tests.metadata.conftest import MetadataClient, member
from tests.metadata.streams import StreamReader


async def put(md: MetadataClient, key: str, value: bytes, lease_id: int = 0) -> int:
    return (await md.kv.Put(metadata_pb2.PutKeyRequest(key=key, value=value, lease_id=lease_id))).revision


async def test_put_get_delete_range(md: MetadataClient) -> None:
    r1 = await put(md, "cfg/a", b"1")
    r2 = await put(md, "cfg/b", b"2")
    r3 = await put(md, "other", b"3")
    assert r1 < r2 < r3
    got = await md.kv.Get(metadata_pb2.GetKeyRequest(key="cfg/a"))
    assert (got.found, got.value, got.mod_revision) == (True, b"1", r1)
    listed = await md.kv.Range(metadata_pb2.RangeRequest(prefix="cfg/"))
    assert [(kv.key, kv.value) for kv in listed.kvs] == [("cfg/a", b"1"), ("cfg/b", b"2")]
    assert listed.revision >= r3
    limited = await md.kv.Range(metadata_pb2.RangeRequest(prefix="", limit=2))
    assert [kv.key for kv in limited.kvs] == ["cfg/a", "cfg/b"]
    deleted = await md.kv.Delete(metadata_pb2.DeleteKeyRequest(key="cfg/a"))
    assert deleted.deleted and deleted.revision > r3
    again = await md.kv.Delete(metadata_pb2.DeleteKeyRequest(key="cfg/a"))
    assert not again.deleted
    assert not (await md.kv.Get(metadata_pb2.GetKeyRequest(key="cfg/a"))).found
    # Membership keys are not visible through the KV API.
    await md.membership.Register(metadata_pb2.RegisterRequest(member=member("e1"), ttl_seconds=10))
    assert [kv.key for kv in (await md.kv.Range(metadata_pb2.RangeRequest())).kvs] == ["cfg/b", "other"]


async def test_compare_and_swap(md: MetadataClient) -> None:
    created = await md.kv.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(key="lock", expected_mod_revision=0,
                                                                            value=b"me"))
    assert created.succeeded and created.current.value == b"me"
    again = await md.kv.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(key="lock", expected_mod_revision=0,
                                                                          value=b"you"))
    assert not again.succeeded
    assert (again.current.value, again.current.mod_revision) == (b"me", created.revision)
    swapped = await md.kv.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(
        key="lock", expected_mod_revision=created.revision, value=b"next"))
    assert swapped.succeeded and swapped.revision > created.revision
    assert (await md.kv.Get(metadata_pb2.GetKeyRequest(key="lock"))).value == b"next"


async def test_compare_and_swap_is_atomic_under_contention(md: MetadataClient) -> None:
    await put(md, "counter", b"0")
    for _ in range(3):
        current = await md.kv.Get(metadata_pb2.GetKeyRequest(key="counter"))
        attempts = await asyncio.gather(*(
            md.kv.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(
                key="counter", expected_mod_revision=current.mod_revision, value=f"{i}".encode()))
            for i in range(12)
        ))
        winners = [a for a in attempts if a.succeeded]
        assert len(winners) == 1
        final = await md.kv.Get(metadata_pb2.GetKeyRequest(key="counter"))
        assert final.mod_revision == winners[0].revision
        assert final.value == winners[0].current.value


async def test_put_bound_to_lease_goes_with_the_lease(md: MetadataClient) -> None:
    reg = await md.membership.Register(metadata_pb2.RegisterRequest(member=member("e1"), ttl_seconds=10))
    await put(md, "owned/x", b"v", lease_id=reg.lease_id)
    assert (await md.kv.Get(metadata_pb2.GetKeyRequest(key="owned/x"))).found
    await md.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=reg.lease_id))
    assert not (await md.kv.Get(metadata_pb2.GetKeyRequest(key="owned/x"))).found
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await put(md, "owned/y", b"v", lease_id=reg.lease_id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert not (await md.kv.Get(metadata_pb2.GetKeyRequest(key="owned/y"))).found


async def test_watch_prefix_resumes_after_a_revision(md: MetadataClient) -> None:
    start = await put(md, "w/a", b"1")
    await put(md, "elsewhere", b"x")
    await put(md, "w/b", b"2")
    await md.kv.Delete(metadata_pb2.DeleteKeyRequest(key="w/a"))
    watch = StreamReader[metadata_pb2.KeyEvent](md.kv.Watch(metadata_pb2.WatchKeysRequest(prefix="w/",
                                                                                      start_revision=start)))
    try:
        e1, e2 = await watch.next(), await watch.next()
        assert (e1.type, e1.kv.key, e1.kv.value) == (metadata_pb2.KEY_PUT, "w/b", b"2")
        assert (e2.type, e2.kv.key) == (metadata_pb2.KEY_DELETE, "w/a")
        assert start < e1.revision < e2.revision
        live = await put(md, "w/c", b"3")
        e3 = await watch.next()
        assert (e3.kv.key, e3.revision, e3.kv.mod_revision) == ("w/c", live, live)
        assert await watch.nothing_within(0.2)
    finally:
        await watch.close()
