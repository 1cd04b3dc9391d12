"""The change log is bounded in bytes: overwriting a 1 MiB key 600 times keeps at most
`retain_bytes` of old values, in a real metadata process (memory backend) or in Redis, and a
watcher resuming from before the bound is told the history is gone (it gets a fresh start,
not a partial replay). etcd keeps its own history (its compaction settings bound it)."""

from __future__ import annotations

import grpc
import pytest
import redis.asyncio as aioredis

from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.rss import rss_bytes
from kvmesh.v1 import metadata_pb2
from tests.metadata.conftest import backend_uri

MiB = 1024**2


@pytest.mark.parametrize("backend", ["memory", "redis"])
async def test_overwrites_of_a_large_key_keep_a_bounded_history(request: pytest.FixtureRequest, backend: str) -> None:
    uri = backend_uri(request, backend)
    uri += ("&" if "?" in uri else "?") + "retain_bytes=32MiB"
    async with process_mesh(metadata=1, metadata_backend=uri) as mesh:
        kv = mesh.kv()
        process = mesh.of_role("metadata")[0].process
        assert process is not None
        first = await kv.Put(metadata_pb2.PutKeyRequest(key="big", value=b"0" * 1000), timeout=10)
        held = await _held(request, backend, process.pid)
        for i in range(600):
            await kv.Put(metadata_pb2.PutKeyRequest(key="big", value=bytes([i % 256]) * (MiB - 64)), timeout=10)
        grown = await _held(request, backend, process.pid) - held
        # Unbounded, the log kept ~600 MiB of old values; the bound is 32 MiB of them.
        assert grown < 200 * MiB, f"{backend}: memory grew by {grown / MiB:.0f} MiB"
        await kv.Delete(metadata_pb2.DeleteKeyRequest(key="big"), timeout=10)
        # Resuming from before the bound: the history is gone, said so, not replayed in part.
        watch = kv.Watch(metadata_pb2.WatchKeysRequest(prefix="big", start_revision=first.revision), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            async for _ in watch:
                break
        assert gone.value.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION)
        # Recent history is still there to resume from.
        last = await kv.Put(metadata_pb2.PutKeyRequest(key="small", value=b"1"), timeout=10)
        await kv.Put(metadata_pb2.PutKeyRequest(key="small", value=b"2"), timeout=10)
        watch = kv.Watch(metadata_pb2.WatchKeysRequest(prefix="small", start_revision=last.revision), timeout=10)
        async for event in watch:
            assert event.kv.value == b"2"
            break


async def _held(request: pytest.FixtureRequest, backend: str, pid: int) -> int:
    """What holds the log: the metadata process (memory), or the Redis server's memory."""
    if backend == "memory":
        return rss_bytes(pid)
    server = request.getfixturevalue("redis")
    host, port = server.address.rsplit(":", 1)
    client = aioredis.Redis(host=host, port=int(port))
    try:
        info = await client.info("memory")
        return int(info["used_memory"])
    finally:
        await client.aclose()
