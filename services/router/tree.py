"""The router's radix tree over chained block ids.

Each node is an edge label: a run of consecutive block ids (a tuple) that every holder holds
whole. Matching a prompt costs one child lookup and one C-level tuple comparison per node on
its path, not per block, so a 128-block prompt that shares a long prefix is matched in a
handful of steps. Nodes are split wherever holders or last-use times would differ inside a
label, so "which pods hold this block, and when each last used it" is always exact.

- `mask`: bitmask of the pod slots holding the node (small ints from `PodTable`).
- `tiers`: None while every holder keeps the node in tier 0 (GPU memory, the usual case);
  otherwise a short list, `tiers[t - 1]` = the slots whose copy is in tier t (CPU, ...:
  `media.py`). Nodes are split where a pod's tier changes inside a run, like for holders, so
  one extra pointer per node keeps "which medium each pod holds this block in" exact.
- Per slot, a dict node → last-used time: removing a pod, or expiring its approximately learnt
  blocks, costs time proportional to that pod's nodes, not to the tree.
- `index`: block id → node for the blocks that precise KV events stored (`stored` names its
  parent id, `removed` names ids; both only ever refer to blocks the same engine stored).
  Blocks learnt approximately from routes are not indexed: a route creates and evicts about a
  hundred blocks, and two hash-table writes per block were most of its cost at a million
  blocks. Matching never uses the index; it follows the chain from the root. Chained ids are
  unique; on a (2^-64) collision the index points at the latest placement.
- Runs are at most `MAX_RUN` blocks: a long chain is a line of nodes. Splitting a node
  (a `stored` event branching off mid-run, a `removed` id inside it) and trimming an evicted
  tail then copy and re-index at most `MAX_RUN` ids, so every event costs time in proportion
  to its own size, never to the run it lands in (a storm of small events against one
  300k-block run used to copy the whole run each time).
- Nodes (`_node.c`) are not tracked by the garbage collector, so a full collection does not
  visit the tree (it took 10-80 ms per collection at a few hundred thousand blocks); nothing in
  the tree forms a cycle but the parent links, and `__del__` cuts those when a tree goes away.
- Eviction is LRU approximated by CLOCK (second chance) over nodes: a FIFO in creation order and
  a `ref` flag that every use sets. The evictor takes a leaf whose flag is clear (trimming its
  tail when fewer blocks are needed), and with it every ancestor that becomes an unused leaf;
  referenced and inner nodes go to the back with the flag cleared. One attribute write per
  node on use, instead of re-linking an LRU list per block.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kvmesh.services.router._node import Node, NodeQueue
from kvmesh.services.router.shards import BlockIndex

__all__ = ["MAX_RUN", "Match", "Node", "PrefixTree", "iter_bits", "set_tier", "tier_of"]

MAX_RUN = 64  # longest run of block ids in one node: bounds the cost of a split or a trim


def tier_of(node: Node, bit: int) -> int:
    """The tier in which the pod with slot bit `bit` holds `node` (0 when it holds it in GPU)."""
    tiers = node.tiers
    if tiers is not None:
        for i, mask in enumerate(tiers):
            if mask & bit:
                return i + 1
    return 0


def set_tier(node: Node, bit: int, tier: int) -> None:
    """Records that the pod with slot bit `bit` holds `node` in `tier` (0 also forgets it)."""
    tiers = node.tiers
    if tiers is None:
        if not tier:
            return
        node.tiers = tiers = [0] * tier
    else:
        keep = ~bit
        for i in range(len(tiers)):
            tiers[i] &= keep
        if len(tiers) < tier:
            tiers.extend([0] * (tier - len(tiers)))
    if tier:
        tiers[tier - 1] |= bit
    elif not any(tiers):
        node.tiers = None


class Match:
    """The result of matching a prompt.

    `depth` blocks of the prompt exist in the tree along its chain. `levels` lists
    (depth, mask) in increasing depth: the pods in `mask` hold exactly the first `depth`
    blocks. Pods in `full` hold all `depth` blocks. `lows` lists (blocks, tiers, mask) for the
    matched nodes some pod holds outside tier 0: `blocks` of the prompt matched in that node,
    `tiers` the node's tier masks, `mask` the candidates holding every block up to it (empty
    when every copy on the path is in GPU memory, the usual case).
    """

    __slots__ = ("depth", "full", "levels", "lows", "total")

    def __init__(
        self,
        depth: int,
        levels: list[tuple[int, int]],
        full: int,
        total: int,
        lows: list[tuple[int, list[int], int]] | None = None,
    ) -> None:
        self.depth = depth
        self.levels = levels
        self.full = full
        self.total = total
        self.lows = lows or []

    def score(self, bit: int, weights: Sequence[float]) -> float:
        """Matched blocks of the pod with slot bit `bit`, each weighted by its tier's weight."""
        depth = self.matched(bit)
        score = depth * weights[0]
        for blocks, tiers, mask in self.lows:
            if mask & bit:
                for i, held in enumerate(tiers):
                    if held & bit:
                        score += blocks * (weights[i + 1] - weights[0]) if i + 1 < len(weights) else 0.0
                        break
        return score

    def matched(self, bit: int) -> int:
        """Blocks the pod with this slot bit holds, counted from the first."""
        if self.full & bit:
            return self.depth
        for depth, mask in self.levels:
            if mask & bit:
                return depth
        return 0

    def best(self) -> tuple[int, int]:
        """(depth, mask) of the pods with the longest match (depth 0: nobody matched)."""
        if self.full and self.depth:
            return self.depth, self.full
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


def _common(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """Length of the common prefix of two tuples."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


class PrefixTree:
    """Radix tree of block-id chains with per-slot holders, bounded by CLOCK eviction."""

    def __init__(self, max_blocks: int) -> None:
        if max_blocks < 1:
            raise ValueError("max_blocks must be at least 1")
        self.max_blocks = max_blocks
        self.root = Node((), None)
        self._index: BlockIndex[Node] = BlockIndex()  # one entry per block (`shards.py`)
        self._held: list[dict[Node, float]] = []
        self._blocks: list[int] = []
        self._clock = NodeQueue()  # (`_node.c`: not tracked by the collector, compacted in place)
        self._live = 0  # nodes in the tree (the CLOCK queue also holds dead ones)
        self._size = 0  # blocks in the tree
        self.evicted = 0

    def __del__(self) -> None:
        """Cuts the parent links (the only cycles among nodes, which the collector cannot see)."""
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            node.children = None
            node.parent = None

    # ---- inspection -------------------------------------------------------------------
    def __len__(self) -> int:
        return self._size

    def __contains__(self, bid: int) -> bool:
        return self._find(bid) is not None

    def _walk(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            if node is not self.root:
                yield node

    def _find(self, bid: int) -> Node | None:
        """The node holding `bid`: the index for stored blocks, else a walk (inspection only)."""
        node = self._index.get(bid)
        if node is not None:
            return node
        for node in self._walk():
            if bid in node.ids:
                return node
        return None

    def nodes(self) -> int:
        return self._live

    def holders(self, bid: int) -> int:
        """Slot mask of the pods holding `bid` (0 when unknown)."""
        node = self._find(bid)
        return node.mask if node is not None else 0

    def parent_of(self, bid: int) -> int | None:
        node = self._find(bid)
        if node is None:
            return None
        j = node.ids.index(bid)
        if j:
            return node.ids[j - 1]
        parent = node.parent
        return parent.ids[-1] if parent is not None and parent.ids else None

    def last_used(self, slot: int, bid: int) -> float | None:
        """When the pod in `slot` last used (stored, or was routed with) `bid`."""
        node = self._find(bid)
        if node is None or slot >= len(self._held):
            return None
        return self._held[slot].get(node)

    def pod_blocks(self, slot: int) -> int:
        return self._blocks[slot] if slot < len(self._blocks) else 0

    def block_ids(self) -> list[int]:
        return [bid for node in self._walk() for bid in node.ids]

    def _slot(self, slot: int) -> dict[Node, float]:
        held = self._held
        while len(held) <= slot:
            held.append({})
            self._blocks.append(0)
        return held[slot]

    # ---- matching ---------------------------------------------------------------------
    def match(self, ids: Sequence[int], candidates: int) -> Match:
        """Walks the chain of `ids`; records where each candidate pod stops holding blocks."""
        prompt = ids if isinstance(ids, tuple) else tuple(ids)
        n = len(prompt)
        node = self.root
        pos = 0
        alive = candidates
        levels: list[tuple[int, int]] = []
        lows: list[tuple[int, list[int], int]] | None = None
        while pos < n:
            children = node.children
            if children is None:
                break
            child = children.get(prompt[pos])
            if child is None:
                break
            label = child.ids
            size = len(label)
            step = size if prompt[pos : pos + size] == label else _common(prompt[pos : pos + size], label)
            if alive:
                held = alive & child.mask
                if held != alive:
                    levels.append((pos, alive ^ held))
                    alive = held
                if child.tiers is not None and alive:
                    if lows is None:
                        lows = []
                    lows.append((step, child.tiers, alive))
            pos += step
            if step < size:
                break
            node = child
        return Match(pos, levels, alive, n, lows)

    # ---- structure ----------------------------------------------------------------------
    def _split(self, node: Node, k: int) -> Node:
        """Cuts `node` after its first k ids; `node` keeps the head, the returned tail the rest."""
        tail = Node(node.ids[k:], node)
        node.ids = node.ids[:k]
        tail.children = node.children
        if tail.children:
            for child in tail.children.values():
                child.parent = tail
        node.children = {tail.ids[0]: tail}
        tail.mask = node.mask
        tail.ref = node.ref
        tail.indexed = node.indexed
        if node.tiers is not None:
            tail.tiers = node.tiers.copy()
        mask = node.mask
        held = self._held
        while mask:
            low = mask & -mask
            d = held[low.bit_length() - 1]
            d[tail] = d[node]
            mask ^= low
        if node.indexed:
            self._index.put_all(tail.ids, tail)
        self._clock.append(tail)
        self._live += 1
        return tail

    def _new_leaves(self, parent: Node, ids: tuple[int, ...], out: list[Node]) -> None:
        """New nodes for `ids` under `parent`, a line of runs of at most MAX_RUN ids (into `out`)."""
        clock = self._clock
        for start in range(0, len(ids), MAX_RUN):
            run = ids[start : start + MAX_RUN]
            leaf = Node(run, parent)
            if parent.children is None:
                parent.children = {}
            parent.children[run[0]] = leaf
            clock.append(leaf)
            out.append(leaf)
            parent = leaf
        self._size += len(ids)
        self._live += (len(ids) + MAX_RUN - 1) // MAX_RUN

    def _descend(self, node: Node, offset: int, ids: tuple[int, ...], create: bool) -> list[Node]:
        """The nodes covering exactly `ids` from position (`node`, after its first `offset` ids).

        Splits nodes so that the returned ones start and end on the run's boundaries; creates
        the missing tail when `create`.
        """
        out: list[Node] = []
        if offset < len(node.ids):
            self._split(node, offset)
        pos = 0
        n = len(ids)
        while pos < n:
            children = node.children
            child = children.get(ids[pos]) if children is not None else None
            if child is None:
                if create:
                    self._new_leaves(node, ids[pos:], out)
                break
            label = child.ids
            size = len(label)
            piece = ids[pos : pos + size]
            step = size if piece == label else _common(piece, label)
            if step < size:
                self._split(child, step)
            out.append(child)
            pos += step
            node = child
            if step < size and pos < n:
                if create:
                    self._new_leaves(node, ids[pos:], out)
                break
        return out

    def _claim(self, slot: int, nodes: list[Node], now: float, tier: int | None = None) -> None:
        """`slot` holds `nodes` (used at `now`); in `tier` when given, else in the tier it had."""
        held = self._slot(slot)
        bit = 1 << slot
        added = 0
        for node in nodes:
            if not node.mask & bit:
                node.mask |= bit
                added += len(node.ids)
            node.ref = True
            held[node] = now
        self._blocks[slot] += added
        if tier is not None:
            for node in nodes:
                if tier or node.tiers is not None:
                    set_tier(node, bit, tier)

    # ---- updates ------------------------------------------------------------------------
    def hold(self, slot: int, ids: Sequence[int], now: float, match: Match | None = None) -> int:
        """The pod in `slot` is assumed to hold the chain `ids` (approximate mode).

        Returns how many blocks it now holds.
        """
        prompt = ids if isinstance(ids, tuple) else tuple(ids)
        self._claim(slot, self._descend(self.root, 0, prompt, create=True), now)
        self._bound()
        return len(prompt)

    def touch(self, slot: int, ids: Sequence[int], depth: int, now: float) -> None:
        """The pod in `slot` used the first `depth` blocks of `ids` (which it holds)."""
        if depth <= 0:
            return
        prompt = tuple(ids[:depth])
        nodes = self._descend(self.root, 0, prompt, create=False)
        self._claim(slot, nodes, now)

    def store(self, slot: int, parent_id: int, ids: Sequence[int], now: float, tier: int = 0) -> int:
        """A precise `stored` event: `ids` chain on from `parent_id` (0: from the root), held in
        `tier` from now on (0: GPU memory).

        Returns the number of blocks stored; -1 when the parent is unknown (the chain cannot be
        placed, so nothing is stored).
        """
        node, offset = self.root, 0
        if parent_id:
            found = self._index.get(parent_id)
            if found is None:
                return -1
            node, offset = found, found.ids.index(parent_id) + 1
        if not ids:
            return 0
        nodes = self._descend(node, offset, tuple(ids), create=True)
        index = self._index
        for n in nodes:
            if not n.indexed:
                n.indexed = True
                index.put_all(n.ids, n)
        self._claim(slot, nodes, now, tier)
        self._bound()
        return len(ids)  # the nodes cover exactly `ids`, created where missing

    def _unindex(self, node: Node, ids: tuple[int, ...]) -> None:
        self._index.remove_all(ids, node)  # only the ids still pointing at this node

    def _delete(self, node: Node) -> None:
        """Removes a leaf with its ids; the caller handles holders."""
        if node.indexed:
            self._unindex(node, node.ids)
        self._size -= len(node.ids)
        parent = node.parent
        assert parent is not None and parent.children is not None
        del parent.children[node.ids[0]]
        if not parent.children:
            parent.children = None
        node.dead = True
        self._live -= 1

    def _collect(self, node: Node | None) -> None:
        """Deletes `node` and then its ancestors while they are held by nobody and childless."""
        root = self.root
        while node is not None and node is not root and node.mask == 0 and not node.children:
            parent = node.parent
            self._delete(node)
            node = parent

    def _release(self, slot: int, node: Node) -> None:
        """`slot` no longer holds `node`."""
        node.mask &= ~(1 << slot)
        if node.tiers is not None:
            set_tier(node, 1 << slot, 0)
        del self._held[slot][node]
        self._blocks[slot] -= len(node.ids)

    def remove(self, slot: int, ids: Sequence[int]) -> int:
        """A precise `removed` event: `slot` no longer holds `ids`. Returns how many it held.

        Consecutive ids of one node go together (an engine evicts a chain's tail block by block:
        one split and one release per run, not per block).
        """
        if slot >= len(self._held):
            return 0
        count = 0
        for node, runs in self._runs(slot, ids).items():
            for first, last in reversed(runs):  # last runs first: the head keeps its offsets
                if last + 1 < len(node.ids):
                    self._split(node, last + 1)
                target = self._split(node, first) if first else node
                self._release(slot, target)
                count += last - first + 1
                self._collect(target)
        self._compact()
        return count

    def _runs(self, slot: int, ids: Sequence[int], tier: int | None = None) -> dict[Node, list[tuple[int, int]]]:
        """The nodes `slot` holds among `ids` (when `tier` is given, those not already in it),
        each with its runs of consecutive offsets (first, last), in increasing order."""
        bit = 1 << slot
        index = self._index
        by_node: dict[Node, list[int]] = {}
        for bid in ids:
            node = index.get(bid)
            if node is not None and node.mask & bit and (tier is None or tier_of(node, bit) != tier):
                by_node.setdefault(node, []).append(node.ids.index(bid))
        out: dict[Node, list[tuple[int, int]]] = {}
        for node, offsets in by_node.items():
            runs: list[tuple[int, int]] = []
            for j in sorted(set(offsets)):
                if runs and runs[-1][1] + 1 == j:
                    runs[-1] = (runs[-1][0], j)
                else:
                    runs.append((j, j))
            out[node] = runs
        return out

    def retier(self, slot: int, ids: Sequence[int], tier: int) -> int:
        """A precise event moved `slot`'s copies of `ids` (which it holds) to `tier`.

        Consecutive ids of one node are moved together (one or two splits per run, not per id),
        so offloading a chain does not cut it into single-block nodes. Returns how many moved.
        """
        if slot >= len(self._held):
            return 0
        bit = 1 << slot
        count = 0
        for node, runs in self._runs(slot, ids, tier).items():
            for first, last in reversed(runs):  # last runs first: the head keeps its offsets
                if last + 1 < len(node.ids):
                    self._split(node, last + 1)
                target = self._split(node, first) if first else node
                set_tier(target, bit, tier)
                count += last - first + 1
        return count

    def clear(self, slot: int) -> int:
        """Forgets every block of `slot` (pod left, or `cleared` event). O(that pod's nodes)."""
        if slot >= len(self._held):
            return 0
        held = self._held[slot]
        count = self._blocks[slot]
        self._held[slot] = {}
        self._blocks[slot] = 0
        bit = 1 << slot
        keep = ~bit
        for node in held:
            if not node.dead:
                node.mask &= keep
                if node.tiers is not None:
                    set_tier(node, bit, 0)
                self._collect(node)
        self._compact()
        return count

    def expire(self, slot: int, cutoff: float) -> int:
        """Drops the blocks `slot` last used before `cutoff`. Returns how many."""
        if slot >= len(self._held):
            return 0
        old = [node for node, stamp in self._held[slot].items() if stamp < cutoff]
        count = 0
        for node in old:
            if not node.dead:
                count += len(node.ids)
                self._release(slot, node)
                self._collect(node)
        self._compact()
        return count

    def _compact(self) -> None:
        """Drops dead nodes from the CLOCK queue once they outnumber live ones."""
        if len(self._clock) > 2 * self._live + 1024:
            self._clock.drop_dead()

    def _bound(self) -> None:
        over = self._size - self.max_blocks
        if over > 0:
            self._evict(over, None)

    def _drop_holders(self, node: Node, count: int) -> None:
        mask = node.mask
        held = self._held
        blocks = self._blocks
        while mask:
            low = mask & -mask
            slot = low.bit_length() - 1
            blocks[slot] -= count
            if count == len(node.ids):
                del held[slot][node]
            mask ^= low

    def evict(self, count: int) -> list[int]:
        """Evicts at least `count` blocks (when there are that many) from unused leaves, by CLOCK.

        Returns the evicted ids, each a leaf block at the moment it went (deepest first).
        """
        out: list[int] = []
        self._evict(count, out)
        return out

    def _evict(self, count: int, out: list[int] | None) -> int:
        """Evicts at least `count` blocks; appends their ids to `out` when given. Returns how many."""
        done = 0
        clock = self._clock
        root = self.root
        budget = 2 * len(clock) + 2
        while done < count and clock and budget > 0:
            budget -= 1
            node: Node | None = clock.popleft()
            assert node is not None
            if node.dead:
                continue
            if node.ref or node.children:
                node.ref = False
                clock.append(node)
                continue
            while node is not None and node is not root and not node.children:
                need = count - done
                if node.mask and (node.ref or need <= 0):
                    break
                size = len(node.ids)
                if node.mask and need < size:
                    # Trim the tail only; the rest of the run stays (and goes back in line).
                    cut = node.ids[size - need :]
                    self._drop_holders(node, need)
                    node.ids = node.ids[: size - need]
                    if node.indexed:
                        self._unindex(node, cut)
                    self._size -= need
                    if out is not None:
                        out.extend(reversed(cut))
                    done += need
                    clock.append(node)
                    break
                self._drop_holders(node, size)
                if out is not None:
                    out.extend(reversed(node.ids))
                done += size
                parent = node.parent
                self._delete(node)
                node = parent
        self.evicted += done
        self._compact()
        return done
