"""The bookkeeping shared by the tiers that carve one preallocated region into extents.

The memory storage (a mapped arena) and the GPU storage (a device tensor) store values the
same way: an allocator hands out (offset, size) extents, an index maps (namespace, key) to
them, values may expire, readers pin an extent so it is never freed under them, and an
eviction policy picks victims among the unpinned ones. Only how the bytes are copied
differs, so this module keeps everything else in one place.

Everything here runs on the event loop thread and never awaits, so no lock is needed.
"""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Protocol

from kvmesh.services.cachenode.storage.base import Counters, StorageStats
from kvmesh.services.cachenode.storage.eviction import EvictionPolicy

Ident = tuple[str, bytes]


class Allocator(Protocol):
    """What the index needs from a region: an arena or a bare `ExtentAllocator`."""

    @property
    def capacity(self) -> int: ...

    def allocate(self, size: int) -> int | None: ...

    def free(self, offset: int, size: int) -> None: ...


def deadline(ttl_seconds: int) -> float:
    """The monotonic expiry of a value stored now (0 = never)."""
    return time.monotonic() + ttl_seconds if ttl_seconds else 0.0


class Extent:
    """One stored value: where it lives, when it expires, and who reads it."""

    __slots__ = ("expires", "live", "offset", "pins", "size")

    def __init__(self, offset: int, size: int, expires: float) -> None:
        self.offset = offset
        self.size = size
        self.expires = expires  # monotonic deadline, 0 = never
        self.pins = 0
        self.live = True  # False once deleted/replaced/evicted; freed when pins reach 0


class ExtentIndex:
    """(namespace, key) → extent, with TTL, pins, policy-driven victims and hit/miss counters.

    `used` counts value bytes held: live values, hidden-but-pinned values, and extents
    claimed by writers that are not published yet.
    """

    def __init__(self, allocator: Allocator, policy: EvictionPolicy) -> None:
        self.allocator = allocator
        self.policy = policy
        self.entries: dict[Ident, Extent] = {}
        self.used = 0
        self.counters = Counters()

    def stats(self, name: str) -> StorageStats:
        return self.counters.stats(name, self.used, self.allocator.capacity, len(self.entries))

    # -- space ---------------------------------------------------------------------------

    def claim(self, size: int) -> int | None:
        """The offset of a fresh extent counted as used, or None when none is free (evict first)."""
        offset = self.allocator.allocate(size)
        if offset is not None:
            self.used += size
        return offset

    def unclaim(self, offset: int, size: int) -> None:
        """Gives back a claimed extent that was never published."""
        self.allocator.free(offset, size)
        self.used -= size

    # -- index ---------------------------------------------------------------------------

    def lookup(self, ident: Ident) -> Extent | None:
        """The live extent of `ident` (an expired one is dropped on the way)."""
        extent = self.entries.get(ident)
        if extent is not None and extent.expires and extent.expires <= time.monotonic():
            self.drop(ident)
            return None
        return extent

    def find(self, ident: Ident) -> Extent | None:
        """`lookup` for a read: counts the hit or miss and tells the policy."""
        extent = self.lookup(ident)
        self.counters.count_reads([extent])
        if extent is None:
            return None
        self.policy.touch(ident)
        return extent

    def publish(self, ident: Ident, extent: Extent) -> None:
        """Makes a filled extent the value of `ident`, retiring the old one."""
        self.drop(ident)
        self.entries[ident] = extent
        self.policy.insert(ident, extent.size)

    def drop(self, ident: Ident) -> Extent | None:
        """Removes `ident` from the index; its extent is freed once nobody pins it."""
        extent = self.entries.pop(ident, None)
        if extent is not None:
            self.policy.remove(ident)
            self.retire(extent)
        return extent

    # -- lifetime ------------------------------------------------------------------------

    def retire(self, extent: Extent) -> None:
        """The value left the index (or was never published): free it now, or at its last unpin."""
        extent.live = False
        self.release(extent)

    def release(self, extent: Extent) -> None:
        if not extent.live and extent.pins == 0:
            self.allocator.free(extent.offset, extent.size)
            self.used -= extent.size

    def unpin(self, extent: Extent) -> None:
        extent.pins -= 1
        self.release(extent)

    # -- eviction ------------------------------------------------------------------------

    def _evictable(self, ident: Hashable) -> bool:
        extent = self.entries.get(ident)  # type: ignore[call-overload]
        return extent is not None and extent.pins == 0

    def victim(self) -> tuple[Ident, Extent] | None:
        """The policy's choice among unpinned values (still indexed), or None when all are pinned."""
        ident = self.policy.victim(self._evictable)
        if ident is None:
            return None
        assert isinstance(ident, tuple)
        return ident, self.entries[ident]
