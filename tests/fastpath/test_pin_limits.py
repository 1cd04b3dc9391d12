"""Pins on the zero-copy path are bounded (issue 13, item 4), against a real node process:
in bytes over all clients, in views per session, in sessions, and in time; a value deleted
while pinned is freed when its last pin goes."""

from __future__ import annotations

import os

import grpc
import pytest

from kvmesh.client.local import LocalDataPath, ViewReleased
from kvmesh.runtime.channels import open_channel
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

pytestmark = pytest.mark.integration

NS = "pins"
MiB = 1 << 20


async def _used(stub: cachenode_pb2_grpc.KVCacheStub) -> int:
    return int((await stub.Stats(cachenode_pb2.StatsRequest())).engines[0].used_bytes)


def _node(kvmesh, *flags: str, capacity: str = "8MiB"):
    return kvmesh("cachenode", "--standalone", "--storage", f"memory://?capacity={capacity}&arena=shm", *flags)


async def test_a_client_pinning_everything_cannot_block_puts(kvmesh) -> None:
    node = _node(kvmesh, "--max-pinned-fraction", "0.5")
    async with open_channel(node.address or "") as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        hog = await LocalDataPath.open(stub, client_id="hog")
        writer = await LocalDataPath.open(stub, client_id="writer")
        try:
            keys = [f"v{i}".encode() for i in range(8)]
            await hog.put_many(NS, [(k, os.urandom(MiB)) for k in keys])
            assert await _used(stub) == 8 * MiB  # full
            held = []
            for key in keys[:4]:  # half the capacity may be pinned ...
                held.extend(await hog.acquire(NS, [key]))
            assert all(v is not None for v in held)
            with pytest.raises(grpc.aio.AioRpcError) as err:  # ... and no more
                await hog.acquire(NS, [keys[4]])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-pinned-fraction" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError):  # a refused batch pins nothing, even its first keys
                await hog.acquire(NS, [keys[5], keys[6]])
            # Another client's puts still find room: the unpinned half is evicted for them.
            fresh = {f"new{i}".encode(): os.urandom(MiB) for i in range(4)}
            await writer.put_many(NS, list(fresh.items()))
            for key, value in fresh.items():  # gRPC reads pin only while they send
                assert (await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=key))).value == value
            extra = os.urandom(MiB)  # gRPC puts find room too (evicting one of those)
            await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"grpc", value=extra))
            assert (await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=b"grpc"))).value == extra
            with pytest.raises(grpc.aio.AioRpcError) as err:  # zero-copy reads wait for the hog's pins to go
                await writer.get(NS, b"grpc")
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for view, key in zip(held, keys[:4], strict=True):  # the pinned values were not touched
                assert view is not None and view.key == key and len(view.view) == MiB
            await hog.release(held)
            assert await writer.get(NS, b"grpc") == extra
        finally:
            await hog.close()
            await writer.close()
        assert node.running()


async def test_a_value_deleted_while_pinned_is_freed_at_unpin(kvmesh) -> None:
    node = _node(kvmesh)
    async with open_channel(node.address or "") as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        path = await LocalDataPath.open(stub)
        try:
            value = os.urandom(2 * MiB)
            await path.put(NS, b"doomed", value)
            (view,) = await path.acquire(NS, [b"doomed"])
            assert view is not None
            assert (await stub.Delete(cachenode_pb2.DeleteRequest(namespace=NS, key=b"doomed"))).deleted
            assert await _used(stub) == 2 * MiB  # hidden, still held by the view
            assert bytes(view.view) == value  # the reader's bytes are intact
            assert await path.release([view]) == 1
            assert await _used(stub) == 0  # capacity came back at unpin
            whole = os.urandom(8 * MiB)
            await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"whole", value=whole))
            assert (await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=b"whole"))).value == whole
        finally:
            await path.close()


async def test_views_past_their_lease_are_released_by_the_node(kvmesh) -> None:
    node = _node(kvmesh, "--view-lease-ms", "300")
    async with open_channel(node.address or "") as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        path = await LocalDataPath.open(stub)
        try:
            assert path.view_lease_ms == 300
            await path.put(NS, b"k", os.urandom(MiB))
            (view,) = await path.acquire(NS, [b"k"])
            assert view is not None
            await stub.Delete(cachenode_pb2.DeleteRequest(namespace=NS, key=b"k"))
            assert await _used(stub) == MiB

            async def freed() -> bool:
                assert await _used(stub) == 0
                return True

            await eventually(freed, timeout=10, interval=0.05, what="the lease to end")
            with pytest.raises(ViewReleased, match="lease"):
                _ = view.view
            # The client's late release of the expired view is accepted, alone or with a read.
            assert await path.release([view]) == 0
            await path.put(NS, b"k2", b"x" * 100)
            (again,) = await path.acquire(NS, [b"k2"])
            assert again is not None
            assert await path.get(NS, b"k2") == b"x" * 100
            await path.release([again])
        finally:
            await path.close()


async def test_views_per_session_and_sessions_are_bounded(kvmesh) -> None:
    node = _node(kvmesh, "--max-views-per-session", "3", "--max-sessions", "2")
    async with open_channel(node.address or "") as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        first = await LocalDataPath.open(stub)
        second = await LocalDataPath.open(stub)
        try:
            await first.put(NS, b"k", b"v" * 10)
            views = await first.acquire(NS, [b"k", b"k", b"k"])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await first.acquire(NS, [b"k"])
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-views-per-session" in (err.value.details() or "")
            assert await second.get(NS, b"k") == b"v" * 10  # another session is not affected
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await LocalDataPath.open(stub)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-sessions" in (err.value.details() or "")
            await first.release(views)
            await first.close()  # its slot frees once the node saw the stream end

            async def attached() -> LocalDataPath:
                return await LocalDataPath.open(stub)

            third = await eventually(
                attached, timeout=10, interval=0.05, what="a free session slot", retry_on=grpc.aio.AioRpcError
            )
            await third.close()
        finally:
            await first.close()
            await second.close()
        assert node.running()
