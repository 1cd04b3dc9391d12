"""The simulated GPU prefix cache: pinning, LRU eviction, visibility only once computed."""

from __future__ import annotations

import pytest

from kvmesh.services.enginesim.prefix_cache import PrefixCache


def test_blocks_are_visible_only_after_commit() -> None:
    c = PrefixCache(10)
    a = c.allocate([1, 2, 3], 0)
    assert c.match([1, 2, 3]) == 0
    assert c.commit(a) == [1, 2, 3]
    assert c.match([1, 2, 3, 4]) == 3
    assert c.match([2, 3]) == 2 and c.match([9, 1]) == 0


def test_pinned_blocks_are_never_evicted() -> None:
    c = PrefixCache(4)
    a = c.allocate([1, 2, 3], 0)
    c.commit(a)
    assert not c.can_allocate([7, 8], 0)  # only 1 block free while 1..3 are pinned
    c.release(a)
    assert c.can_allocate([7, 8], 0)
    b = c.allocate([7, 8], 0)
    assert c.drain_evicted() == [3]  # the tail of the chain goes first, its prefix stays usable
    assert c.match([1, 2, 3]) == 2
    c.release(b)


def test_lru_order_follows_release_and_touch() -> None:
    c = PrefixCache(3)
    for blocks in ([1], [2], [3]):
        a = c.allocate(blocks, 0)
        c.commit(a)
        c.release(a)
    c.touch([1])
    a = c.allocate([4], 0)
    assert c.drain_evicted() == [2]
    c.release(a)


def test_shared_blocks_count_once_and_stay_pinned_until_last_user() -> None:
    c = PrefixCache(5)
    a = c.allocate([1, 2], 0)
    c.commit(a)
    b = c.allocate([1, 2, 3], 1)
    assert c.used == 4 and c.pinned == 4
    c.release(a)
    assert c.pinned == 4  # b still uses 1 and 2
    c.release(b)
    assert c.pinned == 0 and c.used == 2  # the private block is gone, 3 (never computed) too
    assert c.match([1, 2, 3]) == 2


def test_oversized_request_is_served_without_keeping_what_does_not_fit() -> None:
    c = PrefixCache(3)
    assert c.can_allocate(list(range(10)), 0)  # an idle cache always takes the request
    a = c.allocate(list(range(10)), 0)
    assert len(a.blocks) == 3
    c.commit(a)
    c.release(a)
    assert c.match(list(range(10))) == 3


def test_chains_rebuild_every_cached_path() -> None:
    c = PrefixCache(10)
    for blocks in ([1, 2, 3], [1, 2, 4], [5]):
        a = c.allocate(blocks, 0)
        c.commit(a)
        c.release(a)
    assert sorted(c.chains()) == [[1, 2, 3], [1, 2, 4], [5]]


def test_rejects_empty_capacity() -> None:
    with pytest.raises(ValueError):
        PrefixCache(0)
