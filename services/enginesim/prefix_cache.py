"""The simulated GPU's KV blocks: a prefix cache with reference counts and LRU eviction.

Like vLLM's block manager: a block used by a running request is pinned; when the last user
finishes it stays cached (reusable by a later prompt with the same prefix) until space is
needed, then the least recently used free block goes first. A block becomes visible to
prefix matching only once its prefill has been computed (`commit`), so two concurrent
requests with the same new prefix both compute it, as on a real engine.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class _Block:
    refs: int = 0
    ready: bool = False
    parent: int | None = None


@dataclass
class Allocation:
    """Blocks a request holds while it runs."""

    blocks: list[int]
    private: int  # decode blocks that are never shared (no hash)
    fresh: list[int] = field(default_factory=list)  # blocks this request allocated (to commit)


class PrefixCache:
    """`capacity` blocks of KV memory; prefix blocks are shared, decode blocks are private."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least one block")
        self.capacity = capacity
        self._blocks: dict[int, _Block] = {}
        self._free: OrderedDict[int, None] = OrderedDict()  # refs == 0, LRU first
        self._private = 0
        self.evicted: list[int] = []  # ids evicted since the caller last drained them

    @property
    def used(self) -> int:
        """Blocks occupied (cached or in use)."""
        return len(self._blocks) + self._private

    @property
    def pinned(self) -> int:
        """Blocks in use by running requests."""
        return len(self._blocks) - len(self._free) + self._private

    def __contains__(self, block: int) -> bool:
        entry = self._blocks.get(block)
        return entry is not None and entry.ready

    def match(self, blocks: Sequence[int]) -> int:
        """Length of the longest prefix of `blocks` that is cached and computed."""
        n = 0
        for b in blocks:
            entry = self._blocks.get(b)
            if entry is None or not entry.ready:
                break
            n += 1
        return n

    def can_allocate(self, blocks: Sequence[int], private: int) -> bool:
        """Whether `blocks` (+ `private` decode blocks) fit without evicting pinned blocks."""
        needed = private
        reusable_free = 0
        for b in blocks:
            entry = self._blocks.get(b)
            if entry is None:
                needed += 1
            elif entry.refs == 0:
                reusable_free += 1
        available = self.capacity - self.pinned - reusable_free
        return needed <= available or self.pinned == 0

    def allocate(self, blocks: Sequence[int], private: int) -> Allocation:
        """Pins `blocks`, allocating missing ones (evicting free LRU blocks as needed).

        When the request alone is larger than the whole cache, the blocks that do not fit are
        computed but not kept (the allocation only lists the ones held)."""
        held: list[int] = []
        fresh: list[int] = []
        parent: int | None = None
        for b in blocks:
            prev, parent = parent, b
            entry = self._blocks.get(b)
            if entry is not None:
                if entry.refs == 0:
                    self._free.pop(b, None)
                entry.refs += 1
                held.append(b)
                continue
            if not self._make_room(1 + private):
                continue
            self._blocks[b] = _Block(refs=1, parent=prev)
            held.append(b)
            fresh.append(b)
        private_held = 0
        for _ in range(private):
            if not self._make_room(1):
                break
            self._private += 1
            private_held += 1
        return Allocation(held, private_held, fresh)

    def commit(self, allocation: Allocation) -> list[int]:
        """Marks the allocation's fresh blocks as computed; returns them (for 'stored' events)."""
        stored = []
        for b in allocation.fresh:
            entry = self._blocks.get(b)
            if entry is not None and not entry.ready:
                entry.ready = True
                stored.append(b)
        return stored

    def release(self, allocation: Allocation) -> None:
        """Unpins a finished request's blocks; uncomputed ones are dropped, the rest stay cached."""
        self._private -= allocation.private
        allocation.private = 0
        # Tail first, as vLLM frees them: the end of a chain is evicted before its prefix, since
        # a prefix block without its parent could never be matched again.
        for b in reversed(allocation.blocks):
            entry = self._blocks.get(b)
            if entry is None:
                continue
            entry.refs -= 1
            if entry.refs <= 0:
                entry.refs = 0
                if entry.ready:
                    self._free[b] = None
                else:
                    del self._blocks[b]
        allocation.blocks = []

    def touch(self, blocks: Sequence[int]) -> None:
        """Marks free cached blocks as recently used."""
        for b in blocks:
            if b in self._free:
                self._free.move_to_end(b)

    def chains(self) -> list[list[int]]:
        """Every computed block as chains root-first (one per leaf), to resend the whole cache."""
        ready = {b: e for b, e in self._blocks.items() if e.ready}
        inner = {e.parent for e in ready.values() if e.parent is not None}
        out: list[list[int]] = []
        for leaf in ready.keys() - inner:
            chain: list[int] = []
            node: int | None = leaf
            while node is not None and node in ready and len(chain) <= len(ready):
                chain.append(node)
                node = ready[node].parent
            if node is None:  # reached the root: the chain is complete
                out.append(chain[::-1])
        return out

    def drain_evicted(self) -> list[int]:
        out, self.evicted = self.evicted, []
        return out

    def _make_room(self, n: int) -> bool:
        while self.used + n > self.capacity:
            if not self._free:
                return False
            victim, _ = self._free.popitem(last=False)
            del self._blocks[victim]
            self.evicted.append(victim)
        return True
