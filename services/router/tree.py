"""The router's prefix tree over chained block ids.

Block ids are chained hashes (one id names its whole prefix), so the tree is a dict
id → node with parent links instead of per-node child maps: a lookup is one dict probe, and
matching still respects the chain (a prompt's i-th id only matches when its node's parent is
the node matched for id i-1). Each node keeps a bitmask of the pod slots that hold it; each
pod slot keeps its own dict id → last-used time, so removing a pod (or its evicted blocks)
costs time proportional to that pod's blocks, not to the tree.

Eviction is LRU approximated by CLOCK (second chance): a FIFO of nodes in creation order and
one `ref` flag per node that every use sets. The evictor takes nodes from the front: a
referenced one loses its flag and goes to the back, an inner node (it still has children)
goes to the back, a leaf that was not used since the hand last passed is evicted. Exact LRU
would re-link or re-insert 128 nodes per route; CLOCK costs one attribute write per block,
which matters at a 50 µs budget.

A node whose id already exists under another parent (a hash collision, or an inconsistent
client) is never re-parented: the first writer wins and the insertion stops there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence


class Node:
    """One block: its id, its parent (None at the root), which slots hold it, its child count.

    `children` is -1 once the node left the tree (so the CLOCK queue can skip it); `ref` is the
    CLOCK reference flag.
    """

    __slots__ = ("bid", "children", "mask", "parent", "ref")

    def __init__(self, bid: int, parent: Node | None) -> None:
        self.bid = bid
        self.parent = parent
        self.mask = 0
        self.children = 0
        self.ref = True


class Match:
    """The result of matching a prompt: the structural path, and how far each candidate got.

    `levels` lists (depth, mask) in increasing depth: the pods in `mask` hold exactly the first
    `depth` blocks. Pods in `full` hold all of `path`.
    """

    __slots__ = ("full", "levels", "path", "total")

    def __init__(self, path: list[Node], levels: list[tuple[int, int]], full: int, total: int) -> None:
        self.path = path
        self.levels = levels
        self.full = full
        self.total = total

    def matched(self, bit: int) -> int:
        """Blocks the pod with this slot bit holds, counted from the first."""
        if self.full & bit:
            return len(self.path)
        for depth, mask in self.levels:
            if mask & bit:
                return depth
        return 0

    def best(self) -> tuple[int, int]:
        """(depth, mask) of the pods with the longest match (depth 0: nobody matched)."""
        if self.full and self.path:
            return len(self.path), self.full
        for depth, mask in reversed(self.levels):
            if depth:
                return depth, mask
        return 0, 0


def iter_bits(mask: int) -> Iterator[int]:
    """Slot numbers of the set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixTree:
    """Radix tree of block-id chains with per-slot holders, bounded by CLOCK eviction of leaves."""

    def __init__(self, max_blocks: int, evict_batch: int | None = None) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.max_blocks = max_blocks
        # Evicting 1% at a time keeps eviction amortised O(1) per insert.
        self.evict_batch = evict_batch if evict_batch is not None else max(1, max_blocks // 100)
        self._nodes: dict[int, Node] = {}
        self._held: list[dict[int, float]] = []
        self._clock: deque[Node] = deque()
        self.evicted = 0

    # ---- inspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._nodes)

    def __contains__(self, bid: int) -> bool:
        return bid in self._nodes

    def holders(self, bid: int) -> int:
        """Slot mask of the pods holding `bid` (0 when unknown)."""
        node = self._nodes.get(bid)
        return node.mask if node is not None else 0

    def parent_of(self, bid: int) -> int | None:
        node = self._nodes.get(bid)
        if node is None or node.parent is None:
            return None
        return node.parent.bid

    def last_used(self, slot: int, bid: int) -> float | None:
        """When the pod in `slot` last used (stored, or was routed with) `bid`."""
        if slot >= len(self._held):
            return None
        return self._held[slot].get(bid)

    def pod_blocks(self, slot: int) -> int:
        return len(self._held[slot]) if slot < len(self._held) else 0

    def block_ids(self) -> list[int]:
        return list(self._nodes)

    def _slot_dict(self, slot: int) -> dict[int, float]:
        held = self._held
        while len(held) <= slot:
            held.append({})
        return held[slot]

    # ---- matching ---------------------------------------------------------------------
    def match(self, ids: Sequence[int], candidates: int) -> Match:
        """Walks the chain of `ids`; records where each candidate pod stops holding blocks."""
        # All lookups first, in C: independent probes overlap their cache misses.
        found = list(map(self._nodes.get, ids))
        path: list[Node] = []
        levels: list[tuple[int, int]] = []
        alive = candidates
        parent: Node | None = None
        append = path.append
        for node in found:
            if node is None or node.parent is not parent:
                break
            if alive:
                held = alive & node.mask
                if held != alive:
                    levels.append((len(path), alive ^ held))
                    alive = held
            append(node)
            parent = node
        return Match(path, levels, alive, len(ids))

    # ---- updates ------------------------------------------------------------------------
    def _extend(self, parent: Node | None, ids: Sequence[int], start: int, out: list[Node]) -> None:
        """Appends to `out` the nodes of ids[start:], creating the missing ones under `parent`."""
        nodes = self._nodes
        clock = self._clock
        for i in range(start, len(ids)):
            bid = ids[i]
            node = nodes.get(bid)
            if node is None:
                node = Node(bid, parent)
                nodes[bid] = node
                clock.append(node)
                if parent is not None:
                    parent.children += 1
            elif node.parent is not parent:
                return  # the id lives under another parent: first writer wins, stop here
            out.append(node)
            parent = node

    def _hold_all(self, slot: int, path: Sequence[Node], now: float) -> None:
        """Marks `path` held by `slot`, used now."""
        held = self._slot_dict(slot)
        bit = 1 << slot
        for node in path:
            node.mask |= bit
            node.ref = True
            held[node.bid] = now

    def hold(self, slot: int, ids: Sequence[int], now: float, match: Match | None = None) -> int:
        """The pod in `slot` is assumed to hold the chain `ids` (approximate mode).

        `match` (from `match(ids, ...)` just before) saves walking the known part again.
        Returns how many blocks are now held (fewer than len(ids) only on an id conflict).
        """
        if match is None:
            match = self.match(ids, 0)
        path = match.path
        if len(path) < len(ids):
            path = list(path)
            self._extend(path[-1] if path else None, ids, len(path), path)
        self._hold_all(slot, path, now)
        self._bound()
        return len(path)

    def touch(self, slot: int, path: Sequence[Node], now: float) -> None:
        """The pod in `slot` used `path` (a prefix it holds): refresh its use time and CLOCK flag."""
        held = self._slot_dict(slot)
        for node in path:
            node.ref = True
            held[node.bid] = now

    def store(self, slot: int, parent_id: int, ids: Sequence[int], now: float) -> int:
        """A precise `stored` event: `ids` chain on from `parent_id` (0: from the root).

        Returns the number of blocks stored; -1 when the parent is unknown (the chain cannot be
        placed, so nothing is stored).
        """
        parent: Node | None = None
        if parent_id:
            parent = self._nodes.get(parent_id)
            if parent is None:
                return -1
        path: list[Node] = []
        self._extend(parent, ids, 0, path)
        self._hold_all(slot, path, now)
        self._bound()
        return len(path)

    def _collect(self, node: Node | None) -> None:
        """Deletes `node` and then its ancestors while they are held by nobody and childless."""
        nodes = self._nodes
        while node is not None and node.mask == 0 and node.children == 0:
            del nodes[node.bid]
            node.children = -1
            node = node.parent
            if node is not None:
                node.children -= 1

    def remove(self, slot: int, ids: Sequence[int]) -> int:
        """A precise `removed` event: `slot` no longer holds `ids`. Returns how many it held."""
        if slot >= len(self._held):
            return 0
        held = self._held[slot]
        bit = 1 << slot
        nodes = self._nodes
        count = 0
        for bid in ids:
            node = nodes.get(bid)
            if node is None or not node.mask & bit:
                continue
            node.mask ^= bit
            held.pop(bid, None)
            count += 1
            self._collect(node)
        self._compact()
        return count

    def clear(self, slot: int) -> int:
        """Forgets every block of `slot` (pod left, or `cleared` event). O(that pod's blocks)."""
        if slot >= len(self._held):
            return 0
        held = self._held[slot]
        self._held[slot] = {}
        bit = 1 << slot
        nodes = self._nodes
        for bid in held:
            node = nodes.get(bid)
            if node is not None and node.mask & bit:
                node.mask ^= bit
                self._collect(node)
        self._compact()
        return len(held)

    def expired(self, slot: int, cutoff: float) -> list[int]:
        """Ids `slot` last used before `cutoff` (a scan of that pod's blocks only)."""
        if slot >= len(self._held):
            return []
        return [bid for bid, stamp in self._held[slot].items() if stamp < cutoff]

    def expire(self, slot: int, cutoff: float) -> int:
        """Drops the blocks `slot` last used before `cutoff`."""
        old = self.expired(slot, cutoff)
        return self.remove(slot, old) if old else 0

    def _compact(self) -> None:
        """Drops dead nodes from the CLOCK queue once they outnumber live ones."""
        clock = self._clock
        if len(clock) > 2 * len(self._nodes) + 1024:
            self._clock = deque(n for n in clock if n.children >= 0)

    def _bound(self) -> None:
        over = len(self._nodes) - self.max_blocks
        if over > 0:
            self.evict(over + self.evict_batch - 1)

    def evict(self, count: int) -> list[int]:
        """Evicts up to `count` leaves by CLOCK; returns their ids in eviction order."""
        out: list[int] = []
        clock = self._clock
        nodes = self._nodes
        held = self._held
        # Pass one clears flags; in pass two every unreferenced leaf goes, and with it each
        # ancestor that becomes an unreferenced (or unheld) leaf, so a whole stale chain goes
        # at once. Two passes bound the loop even when few leaves exist.
        budget = 2 * len(clock) + 2
        while len(out) < count and clock and budget > 0:
            budget -= 1
            node: Node | None = clock.popleft()
            assert node is not None
            if node.children < 0:
                continue  # already gone
            if node.ref or node.children:
                node.ref = False
                clock.append(node)
                continue
            while node is not None and node.children == 0 and (node.mask == 0 or (not node.ref and len(out) < count)):
                del nodes[node.bid]
                node.children = -1
                mask = node.mask
                while mask:
                    low = mask & -mask
                    held[low.bit_length() - 1].pop(node.bid, None)
                    mask ^= low
                out.append(node.bid)
                node = node.parent
                if node is not None:
                    node.children -= 1
        self.evicted += len(out)
        self._compact()
        return out
