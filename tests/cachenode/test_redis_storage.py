"""Redis-specific behaviour against real redis-server processes: OOM, outages, memory stats."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from kvmesh.runtime.errors import ResourceExhausted, Unavailable
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.tools.testing.servers import start_redis


async def test_full_redis_without_eviction_is_resource_exhausted(tmp_path: Path) -> None:
    server = start_redis(tmp_path, extra_args=["--maxmemory", "4mb", "--maxmemory-policy", "noeviction"])
    try:
        storage = await build_storage(f"redis://{server.address}/0")
        try:
            assert storage.capacity_bytes == 4 * 1024**2  # learned from the server
            with pytest.raises(ResourceExhausted):
                for i in range(20):
                    await storage.put("ns", f"k{i}".encode(), b"x" * 512 * 1024)
            assert await storage.get("ns", b"k0") == b"x" * 512 * 1024  # still serving
            await storage.refresh_stats()
            assert storage.stats().used_bytes > 2 * 1024**2
        finally:
            await storage.close()
    finally:
        server.stop()


async def test_outage_retries_until_the_deadline_then_recovers(tmp_path: Path) -> None:
    server = start_redis(tmp_path)
    storage = await build_storage(f"redis://{server.address}/0?deadline=1.5&timeout=0.5")
    try:
        await storage.put("ns", b"k", b"before")
        server.stop()
        start = time.monotonic()
        with pytest.raises(Unavailable):
            await storage.get("ns", b"k")
        waited = time.monotonic() - start
        assert 0.5 < waited < 8.0  # retried with backoff, bounded by the deadline
        server = start_redis(tmp_path, port=server.port)  # same port, empty (no persistence)
        assert await storage.get("ns", b"k") is None
        await storage.put("ns", b"k", b"after")
        assert await storage.get("ns", b"k") == b"after"
    finally:
        await storage.close()
        server.stop()


async def test_unreachable_redis_fails_to_build_within_the_deadline() -> None:
    start = time.monotonic()
    with pytest.raises(Unavailable):
        await build_storage("redis://127.0.0.1:1/0?deadline=0.5&timeout=0.2")
    # The deadline bounds the whole build: no retries hidden inside redis-py (they took ~4 s).
    assert time.monotonic() - start < 2.0
