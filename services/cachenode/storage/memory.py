"""`memory://?capacity=2GiB&policy=lru|s3fifo&arena=heap|shm` — DRAM with exact byte accounting.

Values live in one arena (see arena.py) as extents; the index (extents.py, shared with the
GPU storage) maps (namespace, key) to an extent. Writers (`begin_write`, see write.py)
reserve an extent, fill it, and commit it (readers never see a partial value); readers may
pin an extent and read it in place. A pinned extent is never freed: eviction skips it, and a
delete or overwrite only hides it until the last pin is released.

Everything here runs on the event loop thread and never awaits between reading and
updating the index, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import Sequence

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.arena import ARENAS, Arena, build_arena
from kvmesh.services.cachenode.storage.base import (
    Capabilities,
    Pinned,
    Reservation,
    StorageStats,
    ZeroCopyStorage,
)
from kvmesh.services.cachenode.storage.eviction import EvictionPolicy, policy_from_uri
from kvmesh.services.cachenode.storage.extents import Extent, ExtentIndex, deadline
from kvmesh.units import format_size
from kvmesh.uri import Uri, UriError

DEFAULT_CAPACITY = 1024**3


class MemoryStorage(ZeroCopyStorage):
    """DRAM storage over an arena with LRU or S3-FIFO eviction."""

    scheme = "memory"
    capabilities = Capabilities(batch=False, zero_copy=True, persistent=False, device_memory=False)

    def __init__(self, arena: Arena, policy: EvictionPolicy, arena_name: str = "heap") -> None:
        super().__init__()
        self._arena = arena
        self._arena_name = arena_name
        self._extents = ExtentIndex(arena, policy)
        self._reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._listener_tasks: set[asyncio.Future[None]] = set()
        self._closed = False

    @classmethod
    async def create(cls, uri: Uri) -> MemoryStorage:
        capacity = uri.size_param("capacity", DEFAULT_CAPACITY)
        if capacity <= 0:
            raise UriError(f"{uri.redacted()}: capacity must be positive")
        arena_name = uri.param("arena", "auto") or "auto"
        if arena_name not in ARENAS.schemes():
            raise UriError(f"{uri.redacted()}: unknown arena {arena_name!r} (known: {', '.join(ARENAS.schemes())})")
        policy = policy_from_uri(uri, capacity)
        return cls(build_arena(arena_name, capacity, uri), policy, arena_name)

    # -- introspection -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"memory({self._extents.policy.name},{self._arena_name},{format_size(self.capacity_bytes)})"

    @property
    def capacity_bytes(self) -> int:
        return self._arena.capacity

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def used_bytes(self) -> int:
        return self._extents.used

    def stats(self) -> StorageStats:
        return self._extents.stats(self.name)

    # -- internals -----------------------------------------------------------------------

    def _evict_one(self) -> bool:
        chosen = self._extents.victim()
        if chosen is None:
            return False
        (namespace, key), extent = chosen
        if self._eviction_listener is not None:
            value = bytes(self._arena.view(extent.offset, extent.size))
            self._notify_eviction(namespace, key, value)
        self._extents.drop((namespace, key))
        self._extents.counters.evictions += 1
        return True

    def _notify_eviction(self, namespace: str, key: bytes, value: bytes) -> None:
        assert self._eviction_listener is not None
        result = self._eviction_listener(namespace, key, value)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._listener_tasks.add(task)
            task.add_done_callback(self._listener_tasks.discard)

    def _claim(self, size: int) -> int:
        """A fresh extent counted as used, evicting until one fits."""
        if size > self._arena.capacity:
            raise ResourceExhausted(
                f"value of {format_size(size)} is larger than the storage capacity {format_size(self.capacity_bytes)}"
            )
        while True:
            offset = self._extents.claim(size)
            if offset is not None:
                return offset
            if not self._evict_one():
                raise ResourceExhausted(
                    f"no room for {format_size(size)}: {format_size(self._extents.used)} of "
                    f"{format_size(self.capacity_bytes)} held and nothing evictable (pinned or being written)"
                )

    # -- zero-copy surface ---------------------------------------------------------------

    def reserve(self, namespace: str, key: bytes, size: int, ttl_seconds: int = 0) -> Reservation:
        if self._closed:
            raise ResourceExhausted("storage is closed")
        if size < 0:
            raise ValueError("size must not be negative")
        offset = self._claim(size)
        res = Reservation(
            next(self._ids), namespace, bytes(key), offset, size, ttl_seconds, self._arena.view(offset, size)
        )
        self._reservations[res.id] = res
        return res

    def commit(self, reservation: Reservation) -> None:
        if self._reservations.pop(reservation.id, None) is None:
            raise ValueError(f"reservation {reservation.id} is not open (committed or aborted already)")
        reservation.view.release()
        extent = Extent(reservation.offset, reservation.size, deadline(reservation.ttl_seconds))
        self._extents.publish((reservation.namespace, reservation.key), extent)

    def abort(self, reservation: Reservation) -> None:
        if self._reservations.pop(reservation.id, None) is None:
            return
        reservation.view.release()
        self._extents.unclaim(reservation.offset, reservation.size)

    def pin(self, namespace: str, key: bytes) -> Pinned | None:
        ident = (namespace, bytes(key))
        extent = self._extents.find(ident)
        if extent is None:
            return None
        extent.pins += 1
        view = self._arena.view(extent.offset, extent.size).toreadonly()
        return Pinned(namespace, ident[1], extent.offset, extent.size, view, lambda: self._extents.unpin(extent))

    # -- Storage --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        with self.begin_write(namespace, key, len(value), ttl_seconds) as write:
            write.view[:] = value
            write.publish()

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        pinned = self.pin(namespace, key)
        if pinned is None:
            return None
        with pinned:
            return bytes(pinned.view)

    async def delete(self, namespace: str, key: bytes) -> bool:
        return self._extents.drop((namespace, bytes(key))) is not None

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return [self._extents.lookup((namespace, bytes(k))) is not None for k in keys]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener_tasks:
            await asyncio.gather(*self._listener_tasks, return_exceptions=True)
        for res in list(self._reservations.values()):
            self.abort(res)
        self._extents.entries.clear()
        self._arena.close()
