"""Eviction policies of the memory storage: LRU and S3-FIFO, chosen by `?policy=`.

A policy only orders keys; the storage owns the bytes. `victim(evictable)` names the next
key to drop, skipping keys the storage says cannot go (a reader holds them pinned), and
returns None when nothing can be evicted, so a full cache of pinned values answers
RESOURCE_EXHAUSTED instead of looping.

S3-FIFO (Yang et al., SOSP'23) suits KV-cache blocks: most prefixes are used once (they
leave through the small FIFO without polluting the main one) while shared system prompts
are hit again and stay.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable

from kvmesh.registry import LazyRegistry
from kvmesh.uri import Uri, UriError

Evictable = Callable[[Hashable], bool]


class EvictionPolicy(ABC):
    """Orders keys for eviction."""

    name: str = ""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes

    @abstractmethod
    def insert(self, key: Hashable, size: int) -> None:
        """A new key was stored."""

    @abstractmethod
    def touch(self, key: Hashable) -> None:
        """A key was read."""

    @abstractmethod
    def remove(self, key: Hashable) -> None:
        """A key left (deleted, replaced or evicted); unknown keys are ignored."""

    @abstractmethod
    def victim(self, evictable: Evictable) -> Hashable | None:
        """The next key to evict (still tracked until `remove`), or None when none can go."""


class LruPolicy(EvictionPolicy):
    """Least recently used first."""

    name = "lru"

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def insert(self, key: Hashable, size: int) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: Hashable) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, evictable: Evictable) -> Hashable | None:
        for key in self._order:
            if evictable(key):
                return key
        return None


class S3FifoPolicy(EvictionPolicy):
    """Small FIFO (10% of bytes) for new keys, main FIFO with reinsertion, ghost FIFO of keys."""

    name = "s3fifo"
    SMALL_FRACTION = 0.1
    MAX_FREQ = 3

    def __init__(self, capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self._small: OrderedDict[Hashable, int] = OrderedDict()  # key → size
        self._main: OrderedDict[Hashable, int] = OrderedDict()
        self._ghost: OrderedDict[Hashable, None] = OrderedDict()
        self._freq: dict[Hashable, int] = {}
        self._small_bytes = 0

    def insert(self, key: Hashable, size: int) -> None:
        self.remove(key)
        self._freq[key] = 0
        if key in self._ghost:
            del self._ghost[key]
            self._main[key] = size
        else:
            self._small[key] = size
            self._small_bytes += size

    def touch(self, key: Hashable) -> None:
        freq = self._freq.get(key)
        if freq is not None and freq < self.MAX_FREQ:
            self._freq[key] = freq + 1

    def remove(self, key: Hashable) -> None:
        if self._freq.pop(key, None) is None:
            return
        size = self._small.pop(key, None)
        if size is not None:
            self._small_bytes -= size
        else:
            self._main.pop(key, None)

    def _remember_ghost(self, key: Hashable) -> None:
        self._ghost[key] = None
        while len(self._ghost) > max(len(self._main), 64):
            self._ghost.popitem(last=False)

    def _from_small(self, evictable: Evictable) -> Hashable | None:
        for _ in range(len(self._small)):
            key, size = next(iter(self._small.items()))
            if self._freq[key] > 0:  # hit again while probationary: promote
                del self._small[key]
                self._small_bytes -= size
                self._main[key] = size
                self._freq[key] = 0
                continue
            if evictable(key):
                self._remember_ghost(key)
                return key
            self._small.move_to_end(key)  # pinned: look past it
        return None

    def _from_main(self, evictable: Evictable) -> Hashable | None:
        # Each pass lowers a frequency or moves past a pinned key, so this ends.
        for _ in range(len(self._main) * (self.MAX_FREQ + 1)):
            key = next(iter(self._main))
            freq = self._freq[key]
            if freq > 0:
                self._freq[key] = freq - 1
                self._main.move_to_end(key)
                continue
            if evictable(key):
                return key
            self._main.move_to_end(key)
        return None

    def victim(self, evictable: Evictable) -> Hashable | None:
        if self._small and (self._small_bytes >= self.capacity_bytes * self.SMALL_FRACTION or not self._main):
            key = self._from_small(evictable)
            if key is not None:
                return key
        key = self._from_main(evictable)
        if key is not None:
            return key
        return self._from_small(evictable)


EVICTION_POLICIES: LazyRegistry[EvictionPolicy] = LazyRegistry("eviction policy")
EVICTION_POLICIES.register("lru", "kvmesh.services.cachenode.storage.eviction", "LruPolicy")
EVICTION_POLICIES.register("s3fifo", "kvmesh.services.cachenode.storage.eviction", "S3FifoPolicy")


def policy_from_uri(uri: Uri, capacity_bytes: int) -> EvictionPolicy:
    """The policy named by `?policy=` (LRU by default), or UriError naming the known ones."""
    name = uri.param("policy", "lru") or "lru"
    try:
        return EVICTION_POLICIES.resolve(name)(capacity_bytes)
    except UriError:
        known = ", ".join(EVICTION_POLICIES.schemes())
        raise UriError(f"{uri.redacted()}: unknown policy {name!r} (known: {known})") from None
