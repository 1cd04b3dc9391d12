"""Disk-storage specifics: state across reopen, and corrupted records answered as misses."""

from __future__ import annotations

from pathlib import Path

import lmdb

from kvmesh.services.cachenode.storage.disk import DiskStorage, _ident
from kvmesh.services.cachenode.storage.registry import build_storage


async def disk(path: Path, capacity: str = "1MiB") -> DiskStorage:
    storage = await build_storage(f"disk://{path}?capacity={capacity}&sync=false")
    assert isinstance(storage, DiskStorage)
    return storage


async def test_accounting_and_eviction_order_survive_reopen(tmp_path: Path) -> None:
    storage = await disk(tmp_path)
    for i in range(6):
        await storage.put("ns", f"k{i}".encode(), bytes([i]) * 100_000)
    used, items = storage.stats().used_bytes, storage.stats().items
    await storage.close()
    storage = await disk(tmp_path)
    try:
        assert (storage.stats().used_bytes, storage.stats().items) == (used, items) == (600_000, 6)
        for i in range(6, 11):  # 1.1 MB into 1 MiB: the oldest writes go first
            await storage.put("ns", f"k{i}".encode(), bytes([i]) * 100_000)
        assert await storage.exists("ns", [b"k0", b"k1", b"k10"]) == [False, True, True]
        assert storage.stats().used_bytes <= 1024**2
    finally:
        await storage.close()


async def test_a_corrupted_record_is_a_miss_not_a_wrong_value(tmp_path: Path) -> None:
    storage = await disk(tmp_path)
    await storage.put("ns", b"k", b"good value")
    await storage.close()
    env = lmdb.open(str(tmp_path), max_dbs=4)
    values = env.open_db(b"values")
    with env.begin(write=True, db=values) as txn:
        raw = txn.get(_ident("ns", b"k"))
        assert raw is not None
        record = bytearray(raw)
        record[-1] ^= 0xFF  # flip bits in the value, leave the stored checksum
        txn.put(_ident("ns", b"k"), bytes(record))
    env.close()
    storage = await disk(tmp_path)
    try:
        assert await storage.exists("ns", [b"k"]) == [False]  # Exists checks the checksum as Get does
        assert await storage.get("ns", b"k") is None
        await storage.put("ns", b"k", b"rewritten")
        assert await storage.get("ns", b"k") == b"rewritten"
        assert await storage.exists("ns", [b"k"]) == [True]
    finally:
        await storage.close()
