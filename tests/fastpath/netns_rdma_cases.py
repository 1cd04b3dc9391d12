"""rdma:// cases that must run inside a private network namespace (Mooncake's TCP transport
binds real ports); `test_rdma.py` runs this file with `unshare -n`. Not collected directly."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh.client.local import LocalDataPath
from kvmesh.client.rdma import RdmaDataPath
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2
from tests.cachenode.test_storage_contract import (  # noqa: F401 - the shared storage contract, on rdma://
    test_concurrent_writers_and_readers_never_see_torn_values,
    test_exists_and_batches_keep_order,
    test_namespaces_never_collide,
    test_overwrite_delete_and_namespaces,
    test_round_trip_of_every_size,
    test_ttl_expires,
)

pytestmark = pytest.mark.integration


@pytest.fixture
async def storage() -> AsyncIterator[Storage]:
    built = await build_storage("rdma://127.0.0.1?capacity=64MiB&protocol=tcp")
    try:
        yield built
    finally:
        await built.close()

NS = "rdma"
MiB = 1 << 20
ENV = {"MC_TCP_BIND_ADDRESS": "127.0.0.1"}


@contextlib.asynccontextmanager
async def rdma_node(capacity: str = "64MiB", timeout_ms: int = 30000) -> AsyncIterator[tuple[str, object]]:
    """A standalone cache node process on rdma:// (Mooncake's TCP transport); yields (address, stub)."""
    async with process_mesh(metadata=0, ready_timeout=60) as mesh:
        node = await mesh.add(
            "cachenode", env=ENV, storage=f"rdma://127.0.0.1?capacity={capacity}&protocol=tcp",
            allocation_timeout_ms=timeout_ms,
        )
        yield node.address, mesh.kvcache()


async def used_bytes(stub) -> int:
    return (await stub.Stats(cachenode_pb2.StatsRequest())).engines[0].used_bytes


async def wait_all_freed(stub, timeout: float = 20.0) -> None:
    async def freed() -> bool:
        return await used_bytes(stub) == 0

    await eventually(freed, timeout=timeout, interval=0.05, what="every byte to be freed")


async def open_path(stub) -> RdmaDataPath:
    return await RdmaDataPath.open(stub, local_hostname="127.0.0.1", protocol="tcp", buffer_bytes=4 * MiB)


async def test_one_sided_put_and_get_round_trip() -> None:
    async with rdma_node() as (_, stub):
        await one_sided_put_and_get_round_trip(stub)


async def one_sided_put_and_get_round_trip(stub) -> None:
    path = await open_path(stub)
    try:
        assert path.base_address > 0 and path.node_segment.startswith("127.0.0.1:")
        # Larger than the 4 MiB staging buffer: split into several transfers.
        values = {f"k{i}".encode(): os.urandom(n) for i, n in enumerate([1, 4095, MiB, 9 * MiB + 3])}
        await path.put_many(NS, list(values.items()))
        assert await path.get_many(NS, [*values, b"missing"]) == [*values.values(), None]
        for key, value in values.items():  # the gRPC path sees what RDMA wrote
            got = await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=key))
            assert got.found and got.value == value
        await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"via-grpc", value=b"g" * 5000))
        out = memoryview(bytearray(8000))
        assert await path.get_into(NS, b"via-grpc", out) == 5000 and bytes(out[:5000]) == b"g" * 5000
        # A client on the node's host still gets the zero-copy path over the same memory.
        local = await LocalDataPath.open(stub)
        try:
            assert await local.get(NS, b"k3") == values[b"k3"]
        finally:
            await local.close()
        stats = (await stub.Stats(cachenode_pb2.StatsRequest())).engines[0]
        assert stats.name.startswith("rdma(tcp,") and stats.items == 5
    finally:
        await path.close()


async def test_bad_input_and_session_end_over_rdma() -> None:
    async with rdma_node(capacity="8MiB", timeout_ms=300) as (_, stub):
        await bad_input_and_session_end_over_rdma(stub)


async def bad_input_and_session_end_over_rdma(stub) -> None:
    path = await open_path(stub)
    try:
        sid = path.session_id
        # Never sealed: dropped after the timeout, space back, later Seal refused clearly.
        alloc = await stub.Allocate(cachenode_pb2.AllocateRequest(session_id=sid, namespace=NS, key=b"u", size=MiB))
        await wait_all_freed(stub)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Seal(cachenode_pb2.SealRequest(session_id=sid, allocation_id=alloc.allocation_id))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # Views held by a session are released when it ends.
        await path.put(NS, b"h", b"h" * MiB)
        views = await stub.Acquire(cachenode_pb2.AcquireRequest(session_id=sid, namespace=NS, keys=[b"h"]))
        assert views.views[0].found
        await stub.Delete(cachenode_pb2.DeleteRequest(namespace=NS, key=b"h"))
        assert (await stub.Stats(cachenode_pb2.StatsRequest())).engines[0].used_bytes == MiB
        await path.close()
        await wait_all_freed(stub)
    finally:
        await path.close()


RDMA_HOLDER = """
import asyncio, sys
from kvmesh.runtime.channels import open_channel
from kvmesh.client.rdma import RdmaDataPath
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc


async def main():
    stub = cachenode_pb2_grpc.KVCacheStub(open_channel(sys.argv[1]))
    path = await RdmaDataPath.open(stub, local_hostname="127.0.0.1", protocol="tcp", buffer_bytes=2 << 20)
    await path.put("rdma", b"held", b"H" * (1 << 20))
    views = await stub.Acquire(
        cachenode_pb2.AcquireRequest(session_id=path.session_id, namespace="rdma", keys=[b"held"]))
    assert views.views[0].found
    await stub.Allocate(cachenode_pb2.AllocateRequest(
        session_id=path.session_id, namespace="rdma", key=b"unsealed", size=2 << 20))
    print("HELD", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_rdma_client_killed_holding_views_releases_them() -> None:
    async with rdma_node(capacity="8MiB", timeout_ms=600_000) as (address, stub):
        await client_killed_holding_views_releases_them(address, stub)


async def client_killed_holding_views_releases_them(address: str, stub) -> None:
    import signal
    import sys

    from kvmesh.tools.processes import kvmesh_env

    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", RDMA_HOLDER, address,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, env=kvmesh_env(ENV),
    )
    try:
        assert holder.stdout is not None
        assert (await asyncio.wait_for(holder.stdout.readline(), 60)).strip() == b"HELD"
        await stub.Delete(cachenode_pb2.DeleteRequest(namespace=NS, key=b"held"))
        assert (await stub.Stats(cachenode_pb2.StatsRequest())).engines[0].used_bytes == 3 * MiB
        holder.send_signal(signal.SIGKILL)
        await asyncio.wait_for(holder.wait(), 10)
        await wait_all_freed(stub)
        value = os.urandom(7 * MiB)  # the space is reclaimable, nothing corrupted
        await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"big", value=value))
        assert (await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=b"big"))).value == value
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
