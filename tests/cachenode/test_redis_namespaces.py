"""The Redis storage keeps namespaces apart whatever bytes they hold (a tenant boundary)."""

from __future__ import annotations

from pathlib import Path

from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.tools.testing.servers import start_redis


async def test_namespace_and_key_bytes_never_map_to_one_redis_key(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    try:
        storage = await build_storage(f"redis://{server.address}/0")
        try:
            # With a NUL separator both were `tenant-a NUL x NUL k`: one tenant overwrote the other.
            await storage.put("tenant-a\0x", b"k", b"written by tenant-a\\0x")
            await storage.put("tenant-a", b"x\0k", b"written by tenant-a")
            assert await storage.get("tenant-a\0x", b"k") == b"written by tenant-a\\0x"
            assert await storage.get("tenant-a", b"x\0k") == b"written by tenant-a"
            # A namespace that is a prefix of another, with the rest moved into the key.
            await storage.put("ab", b"c", b"1")
            assert await storage.get("a", b"bc") is None
            assert await storage.exists("a", [b"bc", b"b"]) == [False, False]
            assert await storage.delete("a", b"bc") is False
            assert await storage.get("ab", b"c") == b"1"
        finally:
            await storage.close()
    finally:
        server.stop()
