"""Native half of tree.py (`_node.c`): the tree's node, not tracked by the garbage collector."""

from __future__ import annotations

class Node:
    ids: tuple[int, ...]
    parent: Node | None
    children: dict[int, Node] | None
    mask: int
    tiers: list[int] | None
    ref: bool
    dead: bool
    indexed: bool
    def __init__(self, ids: tuple[int, ...], parent: Node | None) -> None: ...

class NodeQueue:
    def append(self, node: Node, /) -> None: ...
    def popleft(self) -> Node: ...
    def drop_dead(self) -> int: ...
    def __len__(self) -> int: ...
