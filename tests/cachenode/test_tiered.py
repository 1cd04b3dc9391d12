"""Tier lists: promotion on read, write-through and write-on-eviction, per-tier stats."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.services.cachenode.storage.registry import build_storage, split_tiers
from kvmesh.services.cachenode.storage.tiered import TieredStorage
from kvmesh.uri import UriError

KiB = 1024


async def tiered(uri: str) -> TieredStorage:
    storage = await build_storage(uri)
    assert isinstance(storage, TieredStorage)
    return storage


def test_split_tiers_keeps_cluster_host_lists() -> None:
    assert split_tiers("memory://?capacity=1GiB, redis+cluster://a:1,b:2,c:3?x=1") == [
        "memory://?capacity=1GiB",
        "redis+cluster://a:1,b:2,c:3?x=1",
    ]


async def test_lower_tier_hit_is_promoted(tmp_path: Path) -> None:
    storage = await tiered(f"memory://?capacity=64KiB,disk://{tmp_path}?capacity=1MiB&sync=false")
    l1, l2 = storage.tiers
    try:
        await l2.put("ns", b"only-in-l2", b"v" * 1000)
        assert await l1.get("ns", b"only-in-l2") is None
        assert await storage.get("ns", b"only-in-l2") == b"v" * 1000
        assert await l1.get("ns", b"only-in-l2") == b"v" * 1000  # promoted
        stats = storage.tier_stats()
        assert [s.tier for s in stats] == ["L1", "L2"] and stats[1].hits == 1
    finally:
        await storage.close()


async def test_write_through_reaches_every_tier(tmp_path: Path) -> None:
    storage = await tiered(f"memory://?capacity=64KiB,disk://{tmp_path}?capacity=1MiB&sync=false")
    try:
        for i in range(20):  # 200 KiB: L1 evicts, L2 keeps all
            await storage.put("ns", f"k{i}".encode(), bytes([i]) * (10 * KiB))
        assert all(await storage.tiers[1].exists("ns", [f"k{i}".encode() for i in range(20)]))
        assert await storage.get("ns", b"k0") == bytes([0]) * (10 * KiB)
    finally:
        await storage.close()


async def test_write_back_demotes_on_eviction(tmp_path: Path) -> None:
    storage = await tiered(f"memory://?capacity=64KiB&write=back,disk://{tmp_path}?capacity=1MiB&sync=false")
    l1, l2 = storage.tiers
    try:
        await storage.put("ns", b"first", b"f" * (10 * KiB))
        assert await l2.exists("ns", [b"first"]) == [False]  # not written below yet
        for i in range(10):
            await storage.put("ns", f"k{i}".encode(), bytes([i]) * (10 * KiB))
        await storage.flush()
        assert await l1.exists("ns", [b"first"]) == [False]
        assert await l2.get("ns", b"first") == b"f" * (10 * KiB)  # demoted when L1 evicted it
        assert await storage.get("ns", b"first") == b"f" * (10 * KiB)
        assert storage.demotions >= 1
    finally:
        await storage.close()


async def test_bad_write_mode() -> None:
    with pytest.raises(UriError, match="write"):
        await build_storage("memory://?write=sideways,memory://")
