"""The memory backend's change log is bounded in bytes: overwriting a 1 MiB key 600 times
does not keep 600 old values in a real metadata process, and a watcher resuming from before
the bound is told the history is gone (it gets a fresh start, not a partial replay)."""

from __future__ import annotations

import grpc
import pytest

from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.rss import rss_bytes
from kvmesh.v1 import metadata_pb2

MiB = 1024**2


async def test_overwrites_of_a_large_key_do_not_grow_the_metadata_process() -> None:
    async with process_mesh(metadata=1, metadata_backend="memory://?retain_bytes=32MiB") as mesh:
        kv = mesh.kv()
        process = mesh.of_role("metadata")[0].process
        assert process is not None
        first = await kv.Put(metadata_pb2.PutKeyRequest(key="big", value=b"0" * 1000), timeout=10)
        base = rss_bytes(process.pid)
        for i in range(600):
            await kv.Put(metadata_pb2.PutKeyRequest(key="big", value=bytes([i % 256]) * (MiB - 64)), timeout=10)
        grown = rss_bytes(process.pid) - base
        # Unbounded, the log kept ~600 MiB of old values; the bound is 32 MiB of them.
        assert grown < 200 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        await kv.Delete(metadata_pb2.DeleteKeyRequest(key="big"), timeout=10)
        # Resuming from before the bound: the history is gone, said so, not replayed in part.
        watch = kv.Watch(metadata_pb2.WatchKeysRequest(prefix="big", start_revision=first.revision), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as gone:
            async for _ in watch:
                break
        assert gone.value.code() in (grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.FAILED_PRECONDITION)
