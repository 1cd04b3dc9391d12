"""The extent allocator and heap arena under the memory storage."""

from __future__ import annotations

import random

import pytest

from kvmesh.services.cachenode.storage.arena import ExtentAllocator, HeapArena, build_arena


def take(alloc: ExtentAllocator, size: int) -> int:
    offset = alloc.allocate(size)
    assert offset is not None
    return offset


def test_allocator_best_fit_and_coalescing() -> None:
    alloc = ExtentAllocator(1024, alignment=64)
    a = take(alloc, 100)  # 128
    b = take(alloc, 64)
    c = take(alloc, 200)  # 256
    assert (a, b, c) == (0, 128, 192)
    assert alloc.allocated == 128 + 64 + 256
    alloc.free(b, 64)
    assert alloc.allocate(60) == 128  # the hole is reused (best fit)
    alloc.free(128, 60)
    alloc.free(a, 100)
    alloc.free(c, 200)
    assert alloc.allocated == 0 and alloc.largest_free() == 1024  # all coalesced into one extent


def test_allocator_full_and_double_free() -> None:
    alloc = ExtentAllocator(256, alignment=64)
    offsets = [take(alloc, 64) for _ in range(4)]
    assert alloc.allocate(1) is None
    alloc.free(offsets[1], 64)
    with pytest.raises(ValueError, match="twice"):
        alloc.free(offsets[1], 64)
    with pytest.raises(ValueError):
        alloc.free(10_000, 64)


def test_allocator_random_churn_keeps_invariants() -> None:
    rng = random.Random(7)
    alloc = ExtentAllocator(1 << 20, alignment=64)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            alloc.free(off, live.pop(off))
        else:
            size = rng.randint(1, 40_000)
            got = alloc.allocate(size)
            if got is not None:
                # no overlap with any live extent
                for o, s in live.items():
                    assert got + alloc.rounded(size) <= o or o + alloc.rounded(s) <= got
                live[got] = size
        assert alloc.allocated == sum(alloc.rounded(s) for s in live.values())
    for off, size in live.items():
        alloc.free(off, size)
    assert alloc.largest_free() == alloc.capacity


def test_heap_arena_views_write_through() -> None:
    arena = build_arena("heap", 4096)
    assert isinstance(arena, HeapArena) and arena.capacity == 4096
    off = arena.allocate(10)
    assert off is not None
    view = arena.view(off, 10)
    view[:] = b"0123456789"
    assert bytes(arena.view(off, 10)) == b"0123456789"
    view.release()
    arena.close()
    arena.close()
