"""The interface every cache storage implements, and the capabilities it declares.

Storages are built by an async factory from their URI (no I/O in `__init__`). Values are
stored whole or not at all, and every writer that fills a value in pieces goes through one
API, `begin_write` (see write.py). Capabilities are declared once and checked where they
are used (the tier builder, the zero-copy data path), never probed with `hasattr` or
`isinstance`: the zero-copy surface (pin, arena) is reached through `zero_copy()`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from kvmesh.services.cachenode.storage.write import BufferedWrite, ReservedWrite, Write
from kvmesh.uri import Uri


@dataclass(frozen=True)
class Capabilities:
    """What a storage can do, checked by its users."""

    batch: bool = False  # native batched put/get (pipelining), not just a loop
    zero_copy: bool = False  # values live in memory a client can map: `zero_copy()` is not None
    persistent: bool = False  # values survive a restart of the node
    device_memory: bool = False  # values live in accelerator memory


@dataclass
class StorageStats:
    """Counters reported through KVCache.Stats."""

    name: str
    tier: str = "L1"
    used_bytes: int = 0
    capacity_bytes: int = 0
    items: int = 0
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class Counters:
    """The hit, miss and eviction counts a storage keeps itself, and its stats from them."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def count_reads(self, values: Sequence[object | None]) -> None:
        """Counts a batch of reads: every None is a miss."""
        hits = sum(v is not None for v in values)
        self.hits += hits
        self.misses += len(values) - hits

    def stats(self, name: str, used_bytes: int, capacity_bytes: int, items: int) -> StorageStats:
        return StorageStats(
            name=name,
            used_bytes=used_bytes,
            capacity_bytes=capacity_bytes,
            items=items,
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
        )


# Called with (namespace, key, value) when a storage evicts a value, so a tier can demote it.
EvictionListener = Callable[[str, bytes, bytes], Awaitable[None] | None]


class Storage(ABC):
    """A store of KV-cache blocks: (namespace, key) → immutable bytes."""

    scheme: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self) -> None:
        self._eviction_listener: EvictionListener | None = None

    @classmethod
    @abstractmethod
    async def create(cls, uri: Uri) -> Storage:
        """Builds and connects the storage described by `uri` (raises UriError on bad parameters)."""

    @property
    @abstractmethod
    def name(self) -> str:
        """A short, password-free description, e.g. 'memory(lru)' or 'redis://127.0.0.1:6379/0'."""

    @property
    @abstractmethod
    def capacity_bytes(self) -> int:
        """Total capacity (0 when the storage cannot tell)."""

    @abstractmethod
    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        """Stores a value whole, replacing any old one. Raises ResourceExhausted when it cannot fit."""

    @abstractmethod
    async def get(self, namespace: str, key: bytes) -> bytes | None:
        """The whole value, or None."""

    @abstractmethod
    async def delete(self, namespace: str, key: bytes) -> bool:
        """True when something was deleted."""

    @abstractmethod
    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Presence of each key, in order."""

    @abstractmethod
    def stats(self) -> StorageStats:
        """Current counters."""

    def begin_write(self, namespace: str, key: bytes, size: int, ttl_seconds: int = 0) -> Write:
        """Starts writing a value of `size` bytes, invisible to readers until the write commits.

        Raises ResourceExhausted when the storage knows at once that it cannot hold it. The
        default buffers the value and commits it with `put` (or a WriteBatch's `put_many`).
        """
        return BufferedWrite(self, namespace, key, size, ttl_seconds)

    def zero_copy(self) -> ZeroCopyStorage | None:
        """This storage's zero-copy surface (pin, arena), declared by `capabilities.zero_copy`."""
        return None

    def mappable(self) -> ZeroCopyStorage | None:
        """The storage whose memory data-path clients map: this one, or a tier list's L1."""
        return self.zero_copy()

    async def put_many(
        self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl_seconds: int = 0
    ) -> None:
        """Stores several values; tiers with `capabilities.batch` override this with one round trip."""
        for key, value in items:
            await self.put(namespace, key, value, ttl_seconds)

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """Reads several values; tiers with `capabilities.batch` override this with one round trip."""
        return [await self.get(namespace, key) for key in keys]

    def set_eviction_listener(self, listener: EvictionListener | None) -> None:
        """Registers who hears about evicted values (the tier above, for write-on-eviction)."""
        self._eviction_listener = listener

    def tier_stats(self) -> list[StorageStats]:
        """One entry per tier (a tiered storage reports each of its tiers)."""
        return [self.stats()]

    async def refresh_stats(self) -> None:  # noqa: B027 - most tiers count locally
        """Updates counters that live in a remote server (Redis memory use) before `stats()`."""

    async def close(self) -> None:  # noqa: B027 - tiers without resources need nothing here
        """Releases connections and memory; safe to call twice."""


class Reservation:
    """Space for one value, allocated but invisible to readers until committed.

    The writer fills `view` (in chunks, or a co-located client writes the same bytes through
    shared memory), then the storage's `commit` publishes it whole or `abort` drops it.
    """

    __slots__ = ("id", "key", "namespace", "offset", "size", "ttl_seconds", "view")

    def __init__(
        self, id: int, namespace: str, key: bytes, offset: int, size: int, ttl_seconds: int, view: memoryview
    ) -> None:
        self.id = id
        self.namespace = namespace
        self.key = key
        self.offset = offset
        self.size = size
        self.ttl_seconds = ttl_seconds
        self.view = view


class Pinned:
    """A read-only view of a stored value that the storage will not free until `release()`."""

    __slots__ = ("_release", "key", "namespace", "offset", "size", "view")

    def __init__(
        self,
        namespace: str,
        key: bytes,
        offset: int,
        size: int,
        view: memoryview,
        release: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.key = key
        self.offset = offset
        self.size = size
        self.view = view
        self._release: Callable[[], None] | None = release

    @property
    def released(self) -> bool:
        return self._release is None

    def release(self) -> None:
        """Drops the pin (safe to call twice)."""
        release, self._release = self._release, None
        if release is not None:
            self.view.release()
            release()

    def __enter__(self) -> Pinned:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ZeroCopyStorage(Storage):
    """A storage whose values live in one arena that writers fill and readers see in place.

    Declared by `capabilities.zero_copy`. Writers never call `reserve`/`commit`/`abort`
    themselves: `begin_write` returns a `ReservedWrite`, the one driver of these three.
    Readers that send a value without copying it (BatchGet, Acquire) `pin` it.
    """

    capabilities: ClassVar[Capabilities] = Capabilities(zero_copy=True)

    def begin_write(self, namespace: str, key: bytes, size: int, ttl_seconds: int = 0) -> ReservedWrite:
        """Reserves the value's final place in the arena (evicting if needed)."""
        return ReservedWrite(self, self.reserve(namespace, key, size, ttl_seconds))

    def zero_copy(self) -> ZeroCopyStorage:
        return self

    @property
    @abstractmethod
    def arena(self) -> Any:
        """The `Arena` holding the values (offsets in Reservation/Pinned are into it)."""

    @abstractmethod
    def reserve(self, namespace: str, key: bytes, size: int, ttl_seconds: int = 0) -> Reservation:
        """Allocates space (evicting if needed); raises ResourceExhausted when it cannot. Use `begin_write`."""

    @abstractmethod
    def commit(self, reservation: Reservation) -> None:
        """Publishes a filled reservation, replacing any old value of its key."""

    @abstractmethod
    def abort(self, reservation: Reservation) -> None:
        """Drops a reservation (safe after commit or a previous abort: then nothing happens)."""

    @abstractmethod
    def pin(self, namespace: str, key: bytes) -> Pinned | None:
        """The value held in place until `Pinned.release()`, or None when absent."""
