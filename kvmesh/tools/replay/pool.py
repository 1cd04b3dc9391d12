"""An in-process model of the cache pool (all cache nodes together) for virtual-clock replays.

The real pool is a set of cache nodes with LRU memory storages behind consistent hashing; in
aggregate that behaves like one LRU of the summed capacity, which is what this models. The
live replay uses the real nodes instead, and the e2e test checks the two agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


class PoolModel:
    """An LRU set of block ids holding at most `capacity_blocks`."""

    def __init__(self, capacity_blocks: int) -> None:
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must not be negative")
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def __contains__(self, block: int) -> bool:
        return block in self._blocks

    def prefix_hits(self, blocks: Sequence[int]) -> int:
        """Longest run of `blocks`, from the first, held by the pool (read, so made recent)."""
        n = 0
        for b in blocks:
            if b not in self._blocks:
                break
            self._blocks.move_to_end(b)
            n += 1
        return n

    def put(self, blocks: Sequence[int]) -> None:
        """Offloads blocks (most recently used afterwards), evicting the least recently used."""
        if self.capacity == 0:
            return
        for b in blocks:
            if b in self._blocks:
                self._blocks.move_to_end(b)
                continue
            self._blocks[b] = None
            if len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)
                self.evictions += 1
