"""`memory://?capacity=2GiB&policy=lru|s3fifo&arena=heap|shm` — DRAM with exact byte accounting.

Values live in one arena (see arena.py) as extents; the index maps (namespace, key) to an
extent. Writers reserve an extent, fill it, and commit it (readers never see a partial
value); readers may pin an extent and read it in place. A pinned extent is never freed:
eviction skips it, and a delete or overwrite only hides it until the last pin is released.

Everything here runs on the event loop thread and never awaits between reading and
updating the index, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import Hashable, Sequence

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.units import format_size
from kvmesh.uri import Uri, UriError
from services.cachenode.engines.arena import ARENAS, Arena, build_arena
from services.cachenode.engines.base import (
    Capabilities,
    EngineStats,
    Pinned,
    Reservation,
    ZeroCopyEngine,
)
from services.cachenode.engines.eviction import POLICIES, EvictionPolicy

DEFAULT_CAPACITY = 1024**3


class _Extent:
    """One stored value: where it lives, when it expires, and who reads it."""

    __slots__ = ("expires", "live", "offset", "pins", "size")

    def __init__(self, offset: int, size: int, expires: float) -> None:
        self.offset = offset
        self.size = size
        self.expires = expires  # monotonic deadline, 0 = never
        self.pins = 0
        self.live = True  # False once deleted/replaced/evicted; freed when pins reach 0


class MemoryEngine(ZeroCopyEngine):
    """DRAM engine over an arena with LRU or S3-FIFO eviction."""

    scheme = "memory"
    capabilities = Capabilities(batch=False, zero_copy=True, persistent=False, device_memory=False)

    def __init__(self, arena: Arena, policy: EvictionPolicy, arena_name: str = "heap") -> None:
        super().__init__()
        self._arena = arena
        self._arena_name = arena_name
        self._policy = policy
        self._index: dict[tuple[str, bytes], _Extent] = {}
        self._reservations: dict[int, Reservation] = {}
        self._ids = itertools.count(1)
        self._used = 0  # value bytes held: live values, hidden-but-pinned values, open reservations
        self._hits = 0
        self._misses = 0
        self._evictions = 0
        self._listener_tasks: set[asyncio.Future[None]] = set()
        self._closed = False

    @classmethod
    async def create(cls, uri: Uri) -> MemoryEngine:
        capacity = uri.size_param("capacity", DEFAULT_CAPACITY)
        if capacity <= 0:
            raise UriError(f"{uri.redacted()}: capacity must be positive")
        policy_name = uri.param("policy", "lru") or "lru"
        arena_name = uri.param("arena", "auto") or "auto"
        if arena_name not in ARENAS.schemes():
            raise UriError(f"{uri.redacted()}: unknown arena {arena_name!r} (known: {', '.join(ARENAS.schemes())})")
        try:
            policy = POLICIES.resolve(policy_name)(capacity)
        except UriError:
            raise UriError(
                f"{uri.redacted()}: unknown policy {policy_name!r} (known: {', '.join(POLICIES.schemes())})"
            ) from None
        return cls(build_arena(arena_name, capacity, uri), policy, arena_name)

    # -- introspection -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"memory({self._policy.name},{self._arena_name},{format_size(self.capacity_bytes)})"

    @property
    def capacity_bytes(self) -> int:
        return self._arena.capacity

    @property
    def arena(self) -> Arena:
        return self._arena

    @property
    def used_bytes(self) -> int:
        return self._used

    def stats(self) -> EngineStats:
        return EngineStats(
            name=self.name,
            used_bytes=self._used,
            capacity_bytes=self.capacity_bytes,
            items=len(self._index),
            hits=self._hits,
            misses=self._misses,
            evictions=self._evictions,
        )

    # -- internals -----------------------------------------------------------------------

    def _lookup(self, ident: tuple[str, bytes]) -> _Extent | None:
        extent = self._index.get(ident)
        if extent is not None and extent.expires and extent.expires <= time.monotonic():
            self._drop(ident)
            return None
        return extent

    def _retire(self, extent: _Extent) -> None:
        """The value left the index: free it now, or when its last reader lets go."""
        extent.live = False
        if extent.pins == 0:
            self._arena.free(extent.offset, extent.size)
            self._used -= extent.size

    def _drop(self, ident: tuple[str, bytes]) -> _Extent | None:
        extent = self._index.pop(ident, None)
        if extent is not None:
            self._policy.remove(ident)
            self._retire(extent)
        return extent

    def _evictable(self, ident: Hashable) -> bool:
        extent = self._index.get(ident)  # type: ignore[call-overload]
        return extent is not None and extent.pins == 0

    def _evict_one(self) -> bool:
        ident = self._policy.victim(self._evictable)
        if ident is None:
            return False
        assert isinstance(ident, tuple)
        namespace: str = ident[0]
        key: bytes = ident[1]
        extent = self._index[ident]
        if self._eviction_listener is not None:
            value = bytes(self._arena.view(extent.offset, extent.size))
            self._notify_eviction(namespace, key, value)
        self._drop(ident)
        self._evictions += 1
        return True

    def _notify_eviction(self, namespace: str, key: bytes, value: bytes) -> None:
        assert self._eviction_listener is not None
        result = self._eviction_listener(namespace, key, value)
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._listener_tasks.add(task)
            task.add_done_callback(self._listener_tasks.discard)

    def _allocate(self, size: int) -> int:
        if size > self._arena.capacity:
            raise ResourceExhausted(
                f"value of {format_size(size)} is larger than the engine capacity {format_size(self.capacity_bytes)}"
            )
        while True:
            offset = self._arena.allocate(size)
            if offset is not None:
                return offset
            if not self._evict_one():
                raise ResourceExhausted(
                    f"no room for {format_size(size)}: {format_size(self._used)} of "
                    f"{format_size(self.capacity_bytes)} held and nothing evictable (pinned or being written)"
                )

    # -- zero-copy surface ---------------------------------------------------------------

    def reserve(self, namespace: str, key: bytes, size: int, ttl_seconds: int = 0) -> Reservation:
        if self._closed:
            raise ResourceExhausted("engine is closed")
        if size < 0:
            raise ValueError("size must not be negative")
        offset = self._allocate(size)
        self._used += size
        res = Reservation(
            next(self._ids), namespace, bytes(key), offset, size, ttl_seconds, self._arena.view(offset, size)
        )
        self._reservations[res.id] = res
        return res

    def commit(self, reservation: Reservation) -> None:
        if self._reservations.pop(reservation.id, None) is None:
            raise ValueError(f"reservation {reservation.id} is not open (committed or aborted already)")
        reservation.view.release()
        ident = (reservation.namespace, reservation.key)
        self._drop(ident)
        expires = time.monotonic() + reservation.ttl_seconds if reservation.ttl_seconds else 0.0
        self._index[ident] = _Extent(reservation.offset, reservation.size, expires)
        self._policy.insert(ident, reservation.size)

    def abort(self, reservation: Reservation) -> None:
        if self._reservations.pop(reservation.id, None) is None:
            return
        reservation.view.release()
        self._arena.free(reservation.offset, reservation.size)
        self._used -= reservation.size

    def pin(self, namespace: str, key: bytes) -> Pinned | None:
        ident = (namespace, bytes(key))
        extent = self._lookup(ident)
        if extent is None:
            self._misses += 1
            return None
        self._hits += 1
        self._policy.touch(ident)
        extent.pins += 1
        view = self._arena.view(extent.offset, extent.size).toreadonly()
        return Pinned(namespace, ident[1], extent.offset, extent.size, view, lambda: self._unpin(extent))

    def _unpin(self, extent: _Extent) -> None:
        extent.pins -= 1
        if extent.pins == 0 and not extent.live:
            self._arena.free(extent.offset, extent.size)
            self._used -= extent.size

    # -- Engine --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        res = self.reserve(namespace, key, len(value), ttl_seconds)
        try:
            res.view[:] = value
        except BaseException:
            self.abort(res)
            raise
        self.commit(res)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        pinned = self.pin(namespace, key)
        if pinned is None:
            return None
        with pinned:
            return bytes(pinned.view)

    async def delete(self, namespace: str, key: bytes) -> bool:
        return self._drop((namespace, bytes(key))) is not None

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return [self._lookup((namespace, bytes(k))) is not None for k in keys]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._listener_tasks:
            await asyncio.gather(*self._listener_tasks, return_exceptions=True)
        for res in list(self._reservations.values()):
            self.abort(res)
        self._index.clear()
        self._arena.close()
