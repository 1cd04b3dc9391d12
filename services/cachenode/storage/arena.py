"""Where the memory storage keeps its bytes: one contiguous region and an extent allocator.

The memory storage never owns Python objects per value; it asks an `Arena` for an extent
(offset, size) and reads and writes it through memoryviews. One region means a co-located
client can map the same bytes (the `shm` arena of the zero-copy path) and an RDMA NIC can
register them once; the `heap` arena here is the same layout in anonymous process memory.

Arenas are chosen by name through a lazy registry (`memory://?arena=heap|shm`), so the
shared-memory code is imported only when asked for. Every arena class is built with
`Cls.create(capacity_bytes, uri)`.
"""

from __future__ import annotations

import bisect
import contextlib
import mmap
from typing import Any, Protocol, runtime_checkable

from kvmesh.registry import LazyRegistry
from kvmesh.uri import Uri

DEFAULT_ALIGNMENT = 64  # a cache line: extents never share one, and DMA tiers like it


@runtime_checkable
class Arena(Protocol):
    """A fixed-size byte region with an extent allocator."""

    @property
    def capacity(self) -> int:
        """Bytes in the region."""
        ...

    def allocate(self, size: int) -> int | None:
        """The offset of a fresh extent of `size` bytes, or None when no free extent is large enough."""
        ...

    def free(self, offset: int, size: int) -> None:
        """Returns an extent given by `allocate` (same size)."""
        ...

    def view(self, offset: int, size: int) -> memoryview:
        """A writable view of an extent."""
        ...

    def close(self) -> None:
        """Releases the region (views must be released first); safe to call twice."""
        ...


class ExtentAllocator:
    """Best-fit allocation of aligned extents in [0, capacity), coalescing neighbours on free.

    Free extents are indexed three ways: by (size, offset) in a sorted list for the best fit
    (O(log n) search), and by start and end offset for O(1) coalescing. Shared by every arena
    so the heap and shared-memory arenas behave the same.
    """

    def __init__(self, capacity: int, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if capacity <= 0:
            raise ValueError("arena capacity must be positive")
        if alignment <= 0 or alignment & (alignment - 1):
            raise ValueError("alignment must be a power of two")
        self.alignment = alignment
        self.capacity = capacity - capacity % alignment
        self.allocated = 0  # bytes in allocated extents (rounded up to the alignment)
        self._by_size: list[tuple[int, int]] = []  # (size, offset), sorted
        self._by_start: dict[int, int] = {}  # offset → size
        self._by_end: dict[int, int] = {}  # offset + size → offset
        if self.capacity:
            self._insert(0, self.capacity)

    def rounded(self, size: int) -> int:
        """The extent size actually taken for a value of `size` bytes."""
        a = self.alignment
        return max(a, (size + a - 1) // a * a)

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.allocated

    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    def _insert(self, offset: int, size: int) -> None:
        bisect.insort(self._by_size, (size, offset))
        self._by_start[offset] = size
        self._by_end[offset + size] = offset

    def _remove(self, offset: int, size: int) -> None:
        i = bisect.bisect_left(self._by_size, (size, offset))
        del self._by_size[i]
        del self._by_start[offset]
        del self._by_end[offset + size]

    def allocate(self, size: int) -> int | None:
        need = self.rounded(size)
        i = bisect.bisect_left(self._by_size, (need, -1))
        if i == len(self._by_size):
            return None
        free_size, offset = self._by_size[i]
        self._remove(offset, free_size)
        if free_size > need:
            self._insert(offset + need, free_size - need)
        self.allocated += need
        return offset

    def free(self, offset: int, size: int) -> None:
        need = self.rounded(size)
        if offset < 0 or offset + need > self.capacity or offset % self.alignment:
            raise ValueError(f"extent ({offset}, {size}) is not in this arena")
        if offset in self._by_start:
            raise ValueError(f"extent at {offset} freed twice")
        self.allocated -= need
        start, end = offset, offset + need
        before = self._by_end.get(start)
        if before is not None:
            self._remove(before, start - before)
            start = before
        after = self._by_start.get(end)
        if after is not None:
            self._remove(end, after)
            end += after
        self._insert(start, end - start)


def alignment_of(uri: Uri | None) -> int:
    """`?alignment=` of an arena URI (a cache line by default)."""
    return uri.int_param("alignment", DEFAULT_ALIGNMENT) if uri is not None else DEFAULT_ALIGNMENT


class MappedArena:
    """An arena over one mapping: extents from an `ExtentAllocator`, views into the map.

    Subclasses create the mapping (anonymous, or a named shared-memory segment) and may add
    cleanup to `close()`.
    """

    def __init__(self, allocator: ExtentAllocator, mapping: mmap.mmap) -> None:
        self._alloc = allocator
        self._map: mmap.mmap | None = mapping
        self._buffer = memoryview(mapping)

    @property
    def capacity(self) -> int:
        return self._alloc.capacity

    @property
    def allocator(self) -> ExtentAllocator:
        return self._alloc

    @property
    def closed(self) -> bool:
        return self._map is None

    def buffer(self) -> memoryview:
        """The whole writable region (for registering it with a NIC); valid until close."""
        if self._map is None:
            raise ValueError("arena is closed")
        return self._buffer

    def allocate(self, size: int) -> int | None:
        return self._alloc.allocate(size)

    def free(self, offset: int, size: int) -> None:
        self._alloc.free(offset, size)

    def view(self, offset: int, size: int) -> memoryview:
        if self._map is None:
            raise ValueError("arena is closed")
        return self._buffer[offset : offset + size]

    def close(self) -> None:
        if self._map is None:
            return
        self._buffer.release()
        # A view still exported (a reader holds it) keeps the mapping until it is released.
        with contextlib.suppress(BufferError):
            self._map.close()
        self._map = None


class HeapArena(MappedArena):
    """An arena in anonymous private memory (pages are touched only when written)."""

    def __init__(self, capacity: int, alignment: int = DEFAULT_ALIGNMENT) -> None:
        allocator = ExtentAllocator(capacity, alignment)
        super().__init__(allocator, mmap.mmap(-1, max(allocator.capacity, 1)))

    @classmethod
    def create(cls, capacity: int, uri: Uri | None = None) -> HeapArena:
        return cls(capacity, alignment_of(uri))


ARENAS: LazyRegistry[Any] = LazyRegistry("arena")
ARENAS.register("heap", "kvmesh.services.cachenode.storage.arena", "HeapArena")
ARENAS.register("shm", "kvmesh.services.cachenode.storage.shm_arena", "ShmArena")
ARENAS.register("auto", "kvmesh.services.cachenode.storage.shm_arena", "AutoArena")  # shm when /dev/shm has room


def build_arena(name: str, capacity: int, uri: Uri | None = None) -> Arena:
    """The arena called `name` (heap, shm), `capacity` bytes large."""
    arena: Arena = ARENAS.resolve(name).create(capacity, uri)
    return arena
