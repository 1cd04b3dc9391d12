"""The zero-copy local path through real gRPC and a real shm-backed memory storage, in process."""

from __future__ import annotations

import os

import grpc
import pytest

from kvmesh.client.local import LocalDataPath, LocalPaths, LocalPathUnavailable, ViewReleased, is_local_address
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2
from tests.fastpath.harness import zerocopy_node

NS = "t"


async def test_put_then_get_through_shared_memory() -> None:
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        try:
            value = os.urandom(3 * 1024 * 1024 + 17)
            await path.put(NS, b"k1", value)
            assert await node.storage.get(NS, b"k1") == value  # the storage holds what we wrote in place
            assert await path.get(NS, b"k1") == value
            assert await path.get(NS, b"absent") is None
            await node.storage.put(NS, b"k2", b"from grpc")  # values written by any path are readable
            (view,) = await path.acquire(NS, [b"k2"])
            assert view is not None and bytes(view.view) == b"from grpc"
            with pytest.raises(TypeError):
                view.view[0] = 1  # read-only
            await path.release([view])
            buf = bytearray(len(value))
            assert await path.get_into(NS, b"k1", memoryview(buf)) == len(value)
            assert bytes(buf) == value
        finally:
            await path.close()
        await eventually(lambda: node.sessions() == 0)


async def test_read_after_release_is_a_clear_error_and_double_release_is_refused() -> None:
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        try:
            await path.put(NS, b"k", b"v" * 100)
            (view,) = await path.acquire(NS, [b"k"])
            assert view is not None
            view_id = view.view_id
            assert await path.release([view]) == 1
            with pytest.raises(ViewReleased, match="released"):
                _ = view.view
            # The node refuses the same id twice, and ids it never gave, without changing anything.
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await node.stub.ReleaseViews(
                    cachenode_pb2.ReleaseViewsRequest(session_id=path.session_id, view_ids=[view_id])
                )
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "already released" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await node.stub.ReleaseViews(
                    cachenode_pb2.ReleaseViewsRequest(session_id=path.session_id, view_ids=[987654])
                )
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        finally:
            await path.close()


async def test_seal_twice_and_unknown_ids_are_refused() -> None:
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        try:
            stub, sid = node.stub, path.session_id
            alloc = await stub.Allocate(cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS, key=b"k", size=4))
            await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_id=alloc.allocation_id))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_id=alloc.allocation_id))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "sealed" in (err.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_id=424242))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(cachenode_pb2.AllocateRequest(session_id="nope", namespace=NS, key=b"k", size=4))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS, key=b"", size=4))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(
                    cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS, key=b"k", size=1 << 40)
                )
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            # An aborted allocation publishes nothing; the sealed one is intact.
            alloc2 = await stub.Allocate(cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS, key=b"x", size=4))
            await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_id=alloc2.allocation_id, abort=True))
            assert await node.storage.get(NS, b"x") is None
            assert await node.storage.get(NS, b"k") == b"\0\0\0\0"
            assert node.storage.used_bytes == 4
        finally:
            await path.close()


async def test_allocation_never_sealed_is_dropped_after_the_timeout() -> None:
    async with zerocopy_node(allocation_timeout_ms=300) as node:
        path = await LocalDataPath.open(node.stub)
        try:
            assert path.allocation_timeout_ms == 300
            stub, sid = node.stub, path.session_id
            alloc = await stub.Allocate(
                cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS, key=b"k", size=1 << 20)
            )
            assert node.storage.used_bytes == 1 << 20
            await eventually(lambda: node.storage.used_bytes == 0)  # no leak
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_id=alloc.allocation_id))
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "not sealed within 300 ms" in (err.value.details() or "")
            assert await node.storage.get(NS, b"k") is None
        finally:
            await path.close()


async def test_held_view_survives_eviction_pressure_and_overwrite() -> None:
    async with zerocopy_node("memory://?capacity=4MiB&arena=shm") as node:
        path = await LocalDataPath.open(node.stub)
        try:
            first = b"A" * (1 << 20)
            await path.put(NS, b"held", first)
            (view,) = await path.acquire(NS, [b"held"])
            assert view is not None
            await path.put(NS, b"held", b"B" * (1 << 20))  # overwrite hides it but must not free it
            for i in range(8):  # fill far past capacity: eviction must skip the pinned extent
                await path.put(NS, f"fill{i}".encode(), bytes([i]) * (1 << 20))
            assert bytes(view.view) == first  # not corrupted
            await path.release([view])
            assert await path.get(NS, b"held") in (None, b"B" * (1 << 20))
        finally:
            await path.close()


async def test_capacity_pinned_full_answers_resource_exhausted() -> None:
    # The node lets clients pin all of it here (the default is half: test_pin_limits.py).
    async with zerocopy_node("memory://?capacity=2MiB&arena=shm", max_pinned_fraction=1.0) as node:
        path = await LocalDataPath.open(node.stub)
        try:
            await path.put(NS, b"a", b"a" * (1 << 20))
            await path.put(NS, b"b", b"b" * (1 << 20))
            views = await path.acquire(NS, [b"a", b"b"])
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await path.put(NS, b"c", b"c" * (1 << 20))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await path.release(views)
            await path.put(NS, b"c", b"c" * (1 << 20))  # evictable again
        finally:
            await path.close()


async def test_closing_the_session_releases_views_and_drops_allocations() -> None:
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        await path.put(NS, b"k", b"v" * 1000)
        await node.storage.delete(NS, b"k")  # hidden, but held below
        await path.put(NS, b"k", b"v" * 1000)
        views = await path.acquire(NS, [b"k"])
        assert views[0] is not None
        await node.stub.Allocate(
            cachenode_pb2.AllocateRequest(session_id=path.session_id, namespace=NS, key=b"u", size=5000)
        )
        await node.storage.delete(NS, b"k")
        assert node.storage.used_bytes == 6000  # the held view and the open allocation
        await path.close()
        await eventually(lambda: node.storage.used_bytes == 0)
        await eventually(lambda: node.sessions() == 0)
        with pytest.raises(LocalPathUnavailable):
            await path.put(NS, b"k", b"x")


async def test_storage_without_shared_memory_is_refused_and_locality_detected() -> None:
    async with zerocopy_node("memory://?capacity=1MiB&arena=heap") as node:
        with pytest.raises(LocalPathUnavailable, match="shared-memory"):
            await LocalDataPath.open(node.stub)
    assert await is_local_address("127.0.0.1:5000")
    assert await is_local_address("localhost:5000")
    assert not await is_local_address("192.0.2.1:5000")  # TEST-NET-1: never an interface here
    assert not await is_local_address("no-such-host.invalid:1")


async def test_batches_are_all_or_nothing() -> None:
    async with zerocopy_node("memory://?capacity=8MiB&arena=shm") as node:
        path = await LocalDataPath.open(node.stub)
        try:
            items = [(f"b{i}".encode(), os.urandom(100_000 + i)) for i in range(8)]
            await path.put_many(NS, items)
            assert await path.get_many(NS, [k for k, _ in items] + [b"nope"]) == [v for _, v in items] + [None]
            used = node.storage.used_bytes
            stub, sid = node.stub, path.session_id
            # One item cannot fit: nothing of the batch stays reserved.
            request = cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS)
            request.items.extend(
                [cachenode_pb2.AllocateItem(key=b"x", size=10), cachenode_pb2.AllocateItem(key=b"y", size=1 << 40)]
            )
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Allocate(request)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert node.storage.used_bytes == used
            # A seal naming one bad id seals nothing; the good ones stay open and can be sealed after.
            request = cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS)
            request.items.extend(cachenode_pb2.AllocateItem(key=k, size=3) for k in (b"x", b"y"))
            allocated = await stub.Allocate(request)
            ids = [a.allocation_id for a in allocated.allocations]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_ids=[*ids, 999_999]))
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
            assert await node.storage.exists(NS, [b"x", b"y"]) == [False, False]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_ids=[ids[0], ids[0]]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_ids=ids))
            assert await node.storage.exists(NS, [b"x", b"y"]) == [True, True]
        finally:
            await path.close()


async def test_tier_list_writes_through_and_promotes_for_the_data_path() -> None:
    async with zerocopy_node("memory://?capacity=4MiB&arena=shm,memory://?capacity=32MiB") as node:
        path = await LocalDataPath.open(node.stub)
        try:
            l1, l2 = node.tiered.tiers  # type: ignore[union-attr]
            await path.put(NS, b"w", b"w" * 1000)
            assert await l2.get(NS, b"w") == b"w" * 1000  # written through at the seal
            await l2.put(NS, b"only-l2", b"deep" * 100)
            assert await path.get(NS, b"only-l2") == b"deep" * 100  # promoted into L1, then read in place
            assert await l1.exists(NS, [b"only-l2"]) == [True]
            assert await path.get(NS, b"nowhere") is None
        finally:
            await path.close()


async def test_local_paths_pick_the_local_path_or_fall_back() -> None:
    paths = LocalPaths("auto")
    try:
        async with zerocopy_node() as shm_node, zerocopy_node("memory://?capacity=1MiB&arena=heap") as heap_node:
            path = await paths.for_node("a", shm_node.address, shm_node.stub)
            assert path is not None and path.attached
            assert await paths.for_node("a", shm_node.address, shm_node.stub) is path  # reused
            assert await paths.for_node("b", heap_node.address, heap_node.stub) is None  # no shm: gRPC
            assert await paths.for_node("c", "192.0.2.1:1", shm_node.stub) is None  # another host: gRPC
            never = LocalPaths("never")
            assert await never.for_node("a", shm_node.address, shm_node.stub) is None
            with pytest.raises(ValueError):
                LocalPaths("sometimes")
    finally:
        await paths.close()


async def test_attach_refuses_unknown_or_unoffered_transports_and_foreign_namespaces() -> None:
    async with zerocopy_node() as node:
        for transport, code in ((7, grpc.StatusCode.INVALID_ARGUMENT),
                                (cachenode_pb2.TRANSPORT_RDMA, grpc.StatusCode.FAILED_PRECONDITION)):
            call = node.stub.Attach(cachenode_pb2.AttachRequest(client_id="c", transport=transport))  # type: ignore[arg-type]
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call.read()
            assert err.value.code() == code
        path = await LocalDataPath.open(node.stub)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await path.put(NS, b"k" * 2000, b"v")  # longer than --max-key-bytes
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert node.storage.used_bytes == 0
        finally:
            await path.close()
    async with zerocopy_node("memory://?capacity=1MiB&arena=shm", namespaces="only") as node:
        path = await LocalDataPath.open(node.stub)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await path.put("other", b"k", b"v")
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            await path.put("only", b"k", b"v")
            assert await path.get("only", b"k") == b"v"
        finally:
            await path.close()


async def test_reads_release_their_views_with_the_next_acquire_or_after_a_delay() -> None:
    async with zerocopy_node() as node:
        lazy = await LocalDataPath.open(node.stub, release_delay_s=3600)  # only piggy-backing can release
        quick = await LocalDataPath.open(node.stub, release_delay_s=0.05)
        try:
            await lazy.put(NS, b"a", b"a" * 1000)
            await lazy.put(NS, b"b", b"b" * 1000)
            assert await lazy.get(NS, b"a") == b"a" * 1000
            await node.storage.delete(NS, b"a")
            assert node.storage.used_bytes == 2000  # "a" is still pinned by the finished read
            assert await lazy.get(NS, b"b") == b"b" * 1000  # its Acquire carried the release of "a"
            assert node.storage.used_bytes == 1000
            await lazy.close()  # ending the session releases the pin "b" still has
            assert await quick.get(NS, b"b") == b"b" * 1000
            await node.storage.delete(NS, b"b")
            await eventually(lambda: node.storage.used_bytes == 0)  # released after the delay
        finally:
            await lazy.close()
            await quick.close()
        await eventually(lambda: node.sessions() == 0)
