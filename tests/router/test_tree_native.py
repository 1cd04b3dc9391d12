"""The tree's C parts (`_node.c`): nodes and the CLOCK's queue, outside the collector's view."""

from __future__ import annotations

import gc

import pytest

from kvmesh.services.router._node import Node, NodeQueue
from kvmesh.services.router.tree import PrefixTree


def test_nodes_and_their_maps_are_invisible_to_the_collector() -> None:
    root = Node((), None)
    child = Node((1, 2), root)
    root.children = {1: child}
    assert not gc.is_tracked(root) and not gc.is_tracked(root.children)  # a dict of nodes stays untracked
    assert (child.parent is root, child.ids, child.mask, child.ref, child.dead, child.indexed, child.tiers) == (
        True, (1, 2), 0, True, False, False, None)
    with pytest.raises(TypeError):
        Node((), "not a node")  # type: ignore[arg-type]


def test_a_long_line_of_nodes_is_freed_without_recursion() -> None:
    node = Node((0,), None)
    for i in range(1, 300_000):  # each node holds the last reference to its parent
        node = Node((i,), node)
    del node  # would overflow the C stack if freed recursively


def test_the_queue_keeps_order_and_drops_deleted_nodes_in_place() -> None:
    queue = NodeQueue()
    nodes = [Node((i,), None) for i in range(1000)]
    for n in nodes:
        queue.append(n)
    for n in nodes[::3]:
        n.dead = True
    assert not gc.is_tracked(queue) and len(queue) == 1000
    assert queue.drop_dead() == 334 and len(queue) == 666
    assert [queue.popleft() for _ in range(666)] == [n for n in nodes if not n.dead]
    with pytest.raises(IndexError):
        queue.popleft()
    with pytest.raises(TypeError):
        queue.append("x")  # type: ignore[arg-type]


def test_a_tree_that_goes_away_cuts_its_parent_links() -> None:
    tree = PrefixTree(1000)
    tree.store(0, 0, list(range(1, 200)), now=1.0)
    root = tree.root
    assert root.children
    del tree
    assert root.children is None  # `__del__` ran: nothing is left in a cycle the collector cannot see
