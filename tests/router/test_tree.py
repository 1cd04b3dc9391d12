"""PrefixTree: bounds, CLOCK eviction, conflicts, deep chains and long prompts."""

from __future__ import annotations

import random

from kvmesh.services.router.core import Stored
from kvmesh.services.router.tree import PrefixTree
from tests.router.helpers import core, joined, member


def check_consistent(tree: PrefixTree) -> None:
    ids = set(tree.block_ids())
    children: dict[int, int] = {}
    for bid in ids:
        parent = tree.parent_of(bid)
        if parent is not None:
            assert parent in ids
            children[parent] = children.get(parent, 0) + 1
    for bid in ids:
        assert tree.holders(bid) or children.get(bid, 0), "garbage block left behind"
    # Every node reachable from the root, labels partition the index.
    seen = 0
    stack = [tree.root]
    while stack:
        node = stack.pop()
        seen += len(node.ids)
        for key, child in (node.children or {}).items():
            assert child.parent is node and child.ids[0] == key and not child.dead
            stack.append(child)
    assert seen == len(ids)


def test_size_stays_bounded_and_structure_consistent() -> None:
    rng = random.Random(3)
    tree = PrefixTree(max_blocks=200)
    for i in range(500):
        ids = [rng.getrandbits(64) for _ in range(rng.randrange(1, 30))]
        tree.hold(i % 5, ids, float(i))
        assert len(tree) <= 200
    check_consistent(tree)
    assert tree.evicted > 0


def test_clock_keeps_recently_used_chains() -> None:
    tree = PrefixTree(max_blocks=10_000)
    chains = [[c * 1000 + i for i in range(1, 11)] for c in range(20)]
    for c, ids in enumerate(chains):
        tree.hold(c % 3, ids, 1.0)
    tree.evict(1)  # first pass: every reference flag is cleared
    hot = chains[5]
    tree.touch(2, hot, len(hot), 2.0)
    evicted = tree.evict(150)
    assert not set(hot) & set(evicted)
    assert all(bid in tree for bid in hot)
    check_consistent(tree)


def test_eviction_takes_a_stale_deep_chain_in_one_call() -> None:
    tree = PrefixTree(max_blocks=100_000)
    ids = list(range(1, 1001))
    tree.hold(0, ids, 1.0)
    evicted = tree.evict(1000)
    assert len(evicted) == 1000 and len(tree) == 0


def test_matching_follows_the_chain_not_the_id() -> None:
    tree = PrefixTree(max_blocks=1000)
    tree.hold(0, [1, 2, 3], 1.0)
    # 3 after 9 is another prefix than 3 after 1, 2: no match through it.
    assert tree.match([9, 3], 0b1).best() == (0, 0)
    assert tree.match([2, 3], 0b1).best() == (0, 0)
    assert tree.match([1, 2, 3], 0b1).best() == (3, 0b1)
    check_consistent(tree)


def test_stored_events_need_a_parent_stored_by_an_event() -> None:
    tree = PrefixTree(max_blocks=1000)
    tree.hold(0, [1, 2, 3], 1.0)  # learnt from a route: not an event's parent
    assert tree.store(1, 3, [4], 1.0) == -1
    assert tree.store(1, 0, [1, 2], 1.0) == 2
    assert tree.store(1, 2, [3, 4], 1.0) == 2
    assert tree.match([1, 2, 3, 4], 0b11).matched(0b10) == 4
    assert tree.remove(1, [2]) == 1
    assert tree.match([1, 2, 3, 4], 0b11).matched(0b10) == 1
    check_consistent(tree)


def test_pod_removal_touches_only_its_blocks() -> None:
    tree = PrefixTree(max_blocks=100_000)
    shared = list(range(1, 51))
    tree.hold(0, shared, 1.0)
    tree.hold(1, shared + list(range(100, 150)), 1.0)
    assert tree.clear(0) == 50
    assert len(tree) == 100
    assert all(tree.holders(b) == 0b10 for b in shared)
    assert tree.clear(1) == 100
    assert len(tree) == 0


def test_thousand_deep_chain_from_events_matches_exactly() -> None:
    router = core("prefix", max_prompt_blocks=100_000)
    router.update_pods(joined(member("a"), member("b")))
    ids = [(i * 0x9E3779B97F4A7C15) % (1 << 64) for i in range(1, 1001)]
    parent = 0
    for start in range(0, 1000, 16):
        chunk = ids[start : start + 16]
        assert router.apply_events("a", [Stored(parent, chunk)]).applied == 1
        parent = chunk[-1]
    d = router.route(ids)
    assert d.member_id == "a" and d.matched_blocks == 1000
    diverged = [*ids[:500], 42, *ids[501:]]
    assert router.route(diverged).matched_blocks == 500
    assert router.tree.match(ids[1:], router.pods.all_mask).best() == (0, 0)


def test_thirty_thousand_token_prompts() -> None:
    router = core("prefix", block_size=16)
    router.update_pods(joined(member("a"), member("b"), member("c")))
    rng = random.Random(5)
    prompt = [rng.randrange(50_000) for _ in range(30_000)]
    first = router.route_tokens(prompt, model="m")
    assert first.total_blocks == 30_000 // 16 and first.matched_blocks == 0
    again = router.route_tokens(prompt, model="m")
    assert again.member_id == first.member_id and again.matched_blocks == 1875
    edited = list(prompt)
    edited[20_000] += 1
    assert router.route_tokens(edited, model="m").matched_blocks == 20_000 // 16
