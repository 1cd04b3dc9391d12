"""Hostile BatchPut streams against a real cache node process: a stalled stream announcing a
huge value evicts nothing and blocks no other writer, idle streams are ended by the server,
open streams are bounded, and the disk storage does not preallocate announced sizes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.rss import rss_bytes
from kvmesh.v1 import cachenode_pb2 as pb
from kvmesh.v1 import cachenode_pb2_grpc

NS = "t"
MiB = 1024**2


async def stalled(key: bytes, announced: int, release: asyncio.Event) -> AsyncIterator[pb.PutChunk]:
    """4 KiB of a value announced as `announced` bytes, then nothing until `release`."""
    yield pb.PutChunk(namespace=NS, key=key, total_size=announced, offset=0, data=b"s" * 4096)
    await release.wait()


async def put_many(stub: cachenode_pb2_grpc.KVCacheStub, prefix: str, count: int, size: int) -> int:
    async def chunks() -> AsyncIterator[pb.PutChunk]:
        for i in range(count):
            yield pb.PutChunk(namespace=NS, key=f"{prefix}{i}".encode(), total_size=size, data=b"v" * size)

    answer = await stub.BatchPut(chunks(), timeout=30)
    assert not answer.errors, answer.errors[:3]
    return answer.stored


async def stats(stub: cachenode_pb2_grpc.KVCacheStub) -> pb.EngineStats:
    return (await stub.Stats(pb.StatsRequest(), timeout=10)).engines[0]


async def test_a_stalled_stream_neither_wipes_the_memory_storage_nor_blocks_writers() -> None:
    settings = {"storage": "memory://?capacity=64MiB", "write_idle_timeout_seconds": 2.0}
    async with process_mesh(metadata=0, cachenodes=1, cachenode_settings=settings) as mesh:
        stub = mesh.kvcache()
        assert await put_many(stub, "old", 1000, 8192) == 1000
        release = asyncio.Event()
        hostile = stub.BatchPut(stalled(b"huge", 60 * MiB, release))
        await asyncio.sleep(0.5)  # the 4 KiB chunk is at the node
        before = await stats(stub)
        assert before.items == 1000 and before.evictions == 0  # nothing evicted for bytes not sent
        assert await put_many(stub, "new", 200, 65536) == 200  # other writers are not blocked
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await asyncio.wait_for(hostile, 20)  # the server ends the idle stream by itself
        assert ended.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "--write-idle-timeout-seconds" in (ended.value.details() or "")
        release.set()
        after = await stats(stub)
        assert after.items == 1200 and after.evictions == 0
        present = await stub.Exists(pb.ExistsRequest(namespace=NS, keys=[b"old0", b"old999", b"huge"]))
        assert list(present.present) == [True, True, False]


async def test_open_write_streams_are_bounded_per_connection() -> None:
    settings = {"max_write_streams_per_peer": 2, "write_idle_timeout_seconds": 30.0}
    async with process_mesh(metadata=0, cachenodes=1, cachenode_settings=settings) as mesh:
        stub = mesh.kvcache()
        release = asyncio.Event()
        held = [stub.BatchPut(stalled(f"s{i}".encode(), 8 * MiB, release)) for i in range(2)]
        await asyncio.sleep(0.5)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.BatchPut(stalled(b"third", 8 * MiB, release), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-write-streams-per-peer 2" in (refused.value.details() or "")
        # Another connection is not refused.
        options = [("grpc.use_local_subchannel_pool", 1)]
        async with grpc.aio.insecure_channel(mesh.addresses("cachenode")[0], options=options) as ch:
            assert await put_many(cachenode_pb2_grpc.KVCacheStub(ch), "other", 3, 100) == 3
        release.set()
        for call in held:  # each stalled value ends incomplete: a KeyError, never stored
            answer = await asyncio.wait_for(call, 10)
            assert answer.stored == 0 and answer.errors[0].code == "INVALID_ARGUMENT"
        assert await put_many(stub, "after", 3, 100) == 3  # the streams' slots are free again


async def test_stalled_streams_do_not_make_the_disk_storage_preallocate(tmp_path: Path) -> None:
    settings = {"storage": f"disk://{tmp_path}/store?capacity=1GiB&sync=false", "write_idle_timeout_seconds": 60.0}
    async with process_mesh(metadata=0, cachenodes=1, cachenode_settings=settings) as mesh:
        stub = mesh.kvcache()
        process = mesh.of_role("cachenode")[0].process
        assert process is not None
        assert await put_many(stub, "warm", 10, 4096) == 10
        base = rss_bytes(process.pid)
        release = asyncio.Event()
        calls = [stub.BatchPut(stalled(f"s{i}".encode(), 250 * MiB, release)) for i in range(4)]
        await asyncio.sleep(1.0)
        assert await put_many(stub, "during", 10, 4096) == 10  # the node answers meanwhile
        grown = rss_bytes(process.pid) - base
        # Preallocating would take 1000 MiB; what arrived is 16 KiB.
        assert grown < 64 * MiB, f"RSS grew by {grown / MiB:.0f} MiB for 16 KiB received"
        release.set()
        for call in calls:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await asyncio.wait_for(call, 10)
