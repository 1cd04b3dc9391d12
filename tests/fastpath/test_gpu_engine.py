"""The gpu:// storage. `gpu://cpu` runs the very same code (pool, allocator, staging buffers,
copier) with a CPU tensor; the `cuda:0` tests run only where a CUDA device exists."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.gpu import GpuStorage
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.uri import UriError, parse_uri

NS = "g"
MiB = 1 << 20

# Explicit: this skip means "no NVIDIA GPU in this machine", never a missing feature.
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="real hardware absent: no CUDA device here")


async def make(uri: str) -> GpuStorage:
    storage = await build_storage(uri)
    assert isinstance(storage, GpuStorage)
    return storage


@pytest.fixture(params=["cpu", pytest.param("cuda:0", marks=needs_cuda)])
def device(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_round_trip_values_larger_than_a_staging_buffer(device: str) -> None:
    storage = await make(f"gpu://{device}?capacity=32MiB&staging=64KiB&staging_buffers=2")
    try:
        assert storage.capabilities.device_memory
        assert storage.pool.device.type == device.split(":")[0]
        values = {f"k{i}".encode(): os.urandom(n) for i, n in enumerate([0, 1, 4095, 64 * 1024, 3 * MiB + 7])}
        await asyncio.gather(*(storage.put(NS, k, v) for k, v in values.items()))
        for k, v in values.items():
            assert await storage.get(NS, k) == v
        assert await storage.get(NS, b"missing") is None
        assert await storage.exists(NS, [b"k1", b"missing"]) == [True, False]
        assert await storage.get("other-namespace", b"k1") is None
        assert storage.used_bytes == sum(len(v) for v in values.values())
        await storage.put(NS, b"k1", b"new")
        assert await storage.get(NS, b"k1") == b"new"
        assert await storage.delete(NS, b"k1") and not await storage.delete(NS, b"k1")
        stats = storage.stats()
        assert stats.items == 4 and stats.hits >= 5 and stats.misses >= 2
        view = storage.device_view(NS, b"k2")
        assert view is not None and view.device.type == device.split(":")[0]
        assert bytes(view.cpu().numpy()) == values[b"k2"]
    finally:
        await storage.close()
    assert storage.used_bytes == 0


async def test_lru_eviction_and_capacity_errors() -> None:
    storage = await make("gpu://cpu?capacity=4MiB&policy=lru")
    try:
        for i in range(4):
            await storage.put(NS, f"k{i}".encode(), bytes([i]) * MiB)
        await storage.get(NS, b"k0")  # k0 is now most recently used
        await storage.put(NS, b"k4", b"4" * MiB)
        assert await storage.exists(NS, [b"k0", b"k1", b"k2", b"k3", b"k4"]) == [True, False, True, True, True]
        assert storage.stats().evictions == 1
        assert storage.used_bytes <= storage.capacity_bytes
        with pytest.raises(ResourceExhausted, match="larger than the device pool"):
            await storage.put(NS, b"huge", b"x" * (5 * MiB))
        assert await storage.get(NS, b"k0") == b"\0" * MiB  # nothing changed by the refused put
    finally:
        await storage.close()


async def test_value_being_read_is_never_freed_under_the_reader() -> None:
    storage = await make("gpu://cpu?capacity=2MiB&staging_buffers=1")
    try:
        old = os.urandom(MiB)
        await storage.put(NS, b"a", old)
        await storage.put(NS, b"b", b"b" * MiB)
        staging = storage.copier._free.get_nowait()  # hold the only staging buffer: copies must wait
        reader = asyncio.create_task(storage.get(NS, b"a"))
        await asyncio.sleep(0.05)  # the reader now holds "a" and waits for the staging buffer
        assert await storage.delete(NS, b"a")
        assert storage.used_bytes == 2 * MiB  # hidden, not freed: it is being read
        writer = asyncio.create_task(storage.put(NS, b"c", b"c" * MiB))  # evicts "b", never "a"
        await asyncio.sleep(0.05)
        with pytest.raises(ResourceExhausted, match="nothing evictable"):
            await storage.put(NS, b"d", b"d" * MiB)
        storage.copier._free.put_nowait(staging)
        assert await reader == old  # not corrupted by the writer that came after it
        await writer
        assert await storage.exists(NS, [b"a", b"b", b"c"]) == [False, False, True]
        assert storage.used_bytes == MiB  # the read finished: "a" is freed
        assert await storage.get(NS, b"c") == b"c" * MiB
    finally:
        await storage.close()


async def test_ttl_expires_values() -> None:
    storage = await make("gpu://cpu?capacity=1MiB")
    try:
        await storage.put(NS, b"t", b"v", ttl_seconds=1)
        assert await storage.get(NS, b"t") == b"v"
        await asyncio.sleep(1.2)
        assert await storage.get(NS, b"t") is None
        assert storage.used_bytes == 0
    finally:
        await storage.close()


async def test_gpu_as_l1_of_a_tier_list_demotes_and_promotes() -> None:
    storage = await build_storage("gpu://cpu?capacity=2MiB&write=back,memory://?capacity=16MiB")
    try:
        l1, l2 = storage.tiers  # type: ignore[attr-defined]
        assert l2.capacity_bytes == 16 * MiB
        assert isinstance(l1, GpuStorage)
        values = {f"k{i}".encode(): os.urandom(MiB) for i in range(4)}
        for k, v in values.items():
            await storage.put(NS, k, v)
        for k, v in values.items():
            assert await storage.get(NS, k) == v  # evicted ones come back from L2 (and are promoted)
        assert l1.stats().evictions >= 2
    finally:
        await storage.close()


@pytest.mark.parametrize(
    "uri", ["gpu://tpu:0", "gpu://cpu?capacity=12", "gpu://cpu?policy=fifo", "gpu://cpu?staging=1"]
)
async def test_bad_uris_are_refused(uri: str) -> None:
    with pytest.raises(UriError):
        await GpuStorage.create(parse_uri(uri))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
async def test_cuda_uri_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(UriError, match="CUDA is not available"):
        await GpuStorage.create(parse_uri("gpu://cuda:0"))


@pytest.mark.integration
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=needs_cuda)])
async def test_node_round_trip_through_a_gpu_tier(kvmesh, device: str) -> None:
    from kvmesh.runtime.channels import open_channel
    from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

    node = kvmesh(
        "cachenode", "--standalone", "--storage", f"gpu://{device}?capacity=8MiB&write=back,memory://?capacity=64MiB",
        timeout=60,
    )
    async with open_channel(node.address or "") as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        values = {f"k{i}".encode(): os.urandom(MiB + i) for i in range(12)}  # 12 MiB through an 8 MiB L1
        for key, value in values.items():
            await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=key, value=value))
        for key, value in values.items():
            got = await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=key))
            assert got.found and got.value == value
        tiers = (await stub.Stats(cachenode_pb2.StatsRequest())).engines
        assert tiers[0].name.startswith(f"gpu({device}") and tiers[0].evictions > 0
        assert tiers[0].used_bytes <= 8 * MiB
