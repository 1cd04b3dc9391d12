"""Memory-storage specifics: exact accounting, reservations, pins, and the two policies."""

from __future__ import annotations

import random

import pytest

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.memory import MemoryStorage
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.uri import UriError

KiB = 1024


async def memory(uri: str) -> MemoryStorage:
    storage = await build_storage(uri)
    assert isinstance(storage, MemoryStorage)
    return storage


async def test_exact_byte_accounting_under_churn() -> None:
    storage = await memory("memory://?capacity=1MiB&policy=s3fifo")
    rng = random.Random(3)
    try:
        for i in range(500):
            key = f"k{rng.randrange(60)}".encode()
            if rng.random() < 0.2:
                await storage.delete("ns", key)
            else:
                await storage.put("ns", key, b"v" * rng.randrange(0, 60 * KiB))
            values = [await storage.get("ns", f"k{j}".encode()) for j in range(60)]
            live = [v for v in values if v is not None]
            stats = storage.stats()
            assert stats.used_bytes == sum(len(v) for v in live), i
            assert stats.items == len(live)
            assert stats.used_bytes <= stats.capacity_bytes
    finally:
        await storage.close()


async def test_write_is_invisible_until_commit_and_abort_frees() -> None:
    storage = await memory("memory://?capacity=1MiB")
    try:
        write = storage.begin_write("ns", b"k", 10)
        write.write(0, b"01234")
        assert await storage.get("ns", b"k") is None and await storage.exists("ns", [b"k"]) == [False]
        assert storage.stats().used_bytes == 10  # the reservation holds its bytes
        write.view[5:] = b"56789"
        await write.commit()
        assert await storage.get("ns", b"k") == b"0123456789"
        with pytest.raises(ValueError):
            await write.commit()
        write.abort()  # after commit: nothing happens
        assert await storage.get("ns", b"k") == b"0123456789"
        with storage.begin_write("ns", b"k2", 100) as other:
            other.write(0, b"x" * 100)
        other.abort()
        assert other.closed and storage.stats().used_bytes == 10 and await storage.get("ns", b"k2") is None
        with storage.begin_write("ns", b"k3", 20) as third, pytest.raises(ValueError):
            third.write(15, b"too long")
        assert storage.stats().used_bytes == 10
    finally:
        await storage.close()


async def test_pinned_value_is_never_freed_under_its_reader() -> None:
    storage = await memory("memory://?capacity=256KiB&policy=lru")
    try:
        await storage.put("ns", b"pinned", b"P" * (100 * KiB))
        pin = storage.pin("ns", b"pinned")
        assert pin is not None
        # Overwrite and delete hide it, and pressure evicts everything else, but the bytes stay.
        await storage.put("ns", b"pinned", b"N" * (50 * KiB))
        await storage.delete("ns", b"pinned")
        for i in range(20):
            await storage.put("ns", f"filler{i}".encode(), bytes([i]) * (60 * KiB))
        assert bytes(pin.view) == b"P" * (100 * KiB)
        assert storage.stats().used_bytes <= 256 * KiB
        held = storage.stats().used_bytes
        pin.release()
        pin.release()
        assert storage.stats().used_bytes == held - 100 * KiB
    finally:
        await storage.close()


async def test_everything_pinned_means_resource_exhausted() -> None:
    storage = await memory("memory://?capacity=128KiB")
    try:
        await storage.put("ns", b"a", b"a" * (100 * KiB))
        pin = storage.pin("ns", b"a")
        with pytest.raises(ResourceExhausted):
            await storage.put("ns", b"b", b"b" * (100 * KiB))
        with pytest.raises(ResourceExhausted):
            await storage.put("ns", b"huge", b"h" * (200 * KiB))
        assert pin is not None
        pin.release()
        await storage.put("ns", b"b", b"b" * (100 * KiB))
        assert await storage.get("ns", b"a") is None and storage.stats().evictions == 1
    finally:
        await storage.close()


async def test_lru_evicts_least_recently_used() -> None:
    storage = await memory("memory://?capacity=4KiB&policy=lru&alignment=64")
    try:
        for k in (b"a", b"b", b"c", b"d"):
            await storage.put("ns", k, b"x" * 1000)
        await storage.get("ns", b"a")  # a becomes most recent
        await storage.put("ns", b"e", b"x" * 1000)
        assert await storage.exists("ns", [b"a", b"b", b"c", b"d", b"e"]) == [True, False, True, True, True]
    finally:
        await storage.close()


async def test_s3fifo_keeps_reused_keys_through_a_scan() -> None:
    storage = await memory("memory://?capacity=64KiB&policy=s3fifo")
    try:
        hot = [f"hot{i}".encode() for i in range(8)]
        for k in hot:
            await storage.put("ns", k, b"h" * 1000)
            await storage.get("ns", k)
        for i in range(500):  # a one-pass scan of cold keys, 8x the capacity
            await storage.put("ns", f"cold{i}".encode(), b"c" * 1000)
            if i % 10 == 0:
                for k in hot:
                    await storage.get("ns", k)
        assert all(await storage.exists("ns", hot))
    finally:
        await storage.close()


@pytest.mark.parametrize(
    "uri", ["memory://?capacity=0", "memory://?policy=nope", "memory://?arena=nope", "memory://?capacity=lots"]
)
async def test_bad_memory_uris(uri: str) -> None:
    with pytest.raises(UriError):
        await build_storage(uri)
