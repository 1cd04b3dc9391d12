"""The router's per-block maps, built so that no single resize holds the event loop for long.

A CPython dict grows by rebuilding its whole table in one call: with one entry per block, the
insert that makes a map of 87,381 entries grow cost 7.2 ms of CPU on the development machine
(15.8 ms at 174,762; tens of milliseconds at a million), all inside one event-loop turn. Split
by key hash into `SHARDS` dicts, each resize touches 1/`SHARDS` of the entries. Equal shards
would also grow in step, and all resize within the same few events (an engine numbering its
blocks 1, 2, 3... fills them round robin: 64 resizes, 5 MB of new pages, in one 128-block slice),
so the shards get unequal shares of the keys, in ratios spread evenly over a doubling: each one
then crosses its next size at its own moment, evenly spaced over the growth. Bulk writes (an
event's blocks) run in C (`_shards.c`), one call per event instead of a Python loop per entry.

`BlockIndex` (block id → tree node) is in C altogether: ids stored inline in 256 small
open-addressing tables, outside the garbage collector's view, so that a full collection does
not visit one int per stored block (40 ms at 400k blocks here, each time one ran).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

from kvmesh.services.router import _shards
from kvmesh.services.router._shards import BlockIndex

__all__ = ["SHARDS", "BlockIndex", "ShardedDict"]

K = TypeVar("K")
V = TypeVar("V")

SHARDS = 64
BUCKETS = 1024  # a key's hash picks a bucket; buckets are dealt to shards in unequal numbers
_MASK = BUCKETS - 1


def staggered_shares(shards: int, buckets: int) -> list[int]:
    """The shard of each bucket: shard i gets a share of buckets proportional to 2^(i/shards),
    its buckets spread over the range (an odd stride), so that keys inserted in hash order (an
    engine counting its blocks) reach every shard early and each shard's oldest keys are old."""
    weights = [2 ** (i / shards) for i in range(shards)]
    total = sum(weights)
    owner: list[int] = []
    used = 0.0
    for i, w in enumerate(weights):
        used += w
        owner.extend([i] * (round(used / total * buckets) - len(owner)))
    return [owner[(b * 389) % buckets] for b in range(buckets)]


_OWNER = staggered_shares(SHARDS, BUCKETS)


class ShardedDict(Generic[K, V]):
    """The dict operations the router's per-block maps need, over `SHARDS` dicts."""

    __slots__ = ("_buckets", "_shards", "_size")

    def __init__(self) -> None:
        self._shards: list[dict[K, V]] = [{} for _ in range(SHARDS)]
        self._buckets = [self._shards[i] for i in _OWNER]  # bucket → its shard's dict
        self._size = 0  # kept by every write: len() is asked once per event

    def get(self, key: K, default: V | None = None) -> V | None:
        return self._buckets[hash(key) & _MASK].get(key, default)

    def __getitem__(self, key: K) -> V:
        return self._buckets[hash(key) & _MASK][key]

    def __setitem__(self, key: K, value: V) -> None:
        shard = self._buckets[hash(key) & _MASK]
        before = len(shard)
        shard[key] = value
        self._size += len(shard) - before

    def __delitem__(self, key: K) -> None:
        del self._buckets[hash(key) & _MASK][key]
        self._size -= 1

    def __contains__(self, key: object) -> bool:
        return key in self._buckets[hash(key) & _MASK]

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[K]:
        for shard in self._shards:
            yield from shard

    def pop(self, key: K) -> V:
        value = self._buckets[hash(key) & _MASK].pop(key)
        self._size -= 1
        return value

    def update(self, keys: Sequence[K], values: Sequence[V]) -> None:
        """keys[i] → values[i] for every i."""
        self._size += _shards.update(self._buckets, keys, values)

    def clear(self) -> None:
        for shard in self._shards:
            shard.clear()
        self._size = 0

    def oldest(self, count: int) -> list[K]:
        """About `count` of the earliest inserted keys: each shard's oldest, taken in turn (exact
        order across shards is not kept; each shard keeps its own insertion order)."""
        out: list[K] = []
        iters = [iter(shard) for shard in self._shards]
        while len(out) < count and iters:
            alive = []
            for it in iters:
                key = next(it, _END)
                if key is not _END:
                    out.append(key)  # type: ignore[arg-type]
                    alive.append(it)
                    if len(out) >= count:
                        break
            iters = alive
        return out


_END = object()
