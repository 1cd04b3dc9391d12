"""Each routing policy's rule, on a RouterCore with hand-made holdings and loads."""

from __future__ import annotations

from collections import Counter

from kvmesh.membership import MembershipChange
from kvmesh.services.router.core import RouterCore, Stored
from tests.router.helpers import core, joined, member

PROMPT = list(range(1, 11))  # 10 blocks


def setup(policy: str, **kw: float) -> RouterCore:
    router = core(policy, None, **kw)
    router.update_pods(joined(member("a"), member("b"), member("c")))
    return router


def load(router: RouterCore, member_id: str, running: int) -> None:
    router.update_pods(MembershipChange(revision=9, updated=[member(member_id, running=running)]))


def test_random_uses_every_pod() -> None:
    router = setup("random")
    picks = Counter(router.route([], request_id=f"r{i}").member_id for i in range(300))
    assert set(picks) == {"a", "b", "c"} and min(picks.values()) > 50


def test_round_robin_cycles_in_slot_order() -> None:
    router = setup("round-robin")
    picks = [router.route([]).member_id for _ in range(6)]
    assert picks[:3] == picks[3:] and sorted(picks[:3]) == ["a", "b", "c"]


def test_prefix_longest_match_then_imbalance_gate() -> None:
    router = setup("prefix", imbalance_abs=4)
    router.apply_events("b", [Stored(0, PROMPT[:6])])
    router.apply_events("c", [Stored(0, PROMPT[:3])])
    d = router.route(PROMPT, request_id="x")
    assert (d.member_id, d.matched_blocks) == ("b", 6)
    router.release("x")
    load(router, "b", 5)  # max - min = 5 > 4: only the least loaded (a, c) compete; c matches more
    d = router.route(PROMPT)
    assert (d.member_id, d.matched_blocks) == ("c", 3)
    load(router, "b", 4)  # within the gate again
    assert router.route(PROMPT, request_id="y").member_id == "b"


def test_cache_aware_threshold_balance_and_smallest_tree() -> None:
    router = setup("cache-aware", cache_threshold=0.5, balance_abs=3, balance_rel=1.5)
    router.apply_events("a", [Stored(0, PROMPT[:8])])
    router.apply_events("b", [Stored(0, [100, 101, 102])])
    # 8/10 > 0.5: the best match.
    assert router.route(PROMPT, request_id="m").member_id == "a"
    router.release("m")
    # 2/10 < 0.5: the smallest tree (c holds nothing).
    assert router.route([*PROMPT[:2], 77, 78, 79, 80, 81, 82, 83, 84], request_id="s").member_id == "c"
    router.release("s")
    # Imbalanced (a: 10 vs c: 0, 10 > 0 * 1.5): least load even with a full match.
    load(router, "a", 10)
    assert router.route(PROMPT).member_id != "a"


def test_kv_aware_cost_and_temperature() -> None:
    router = setup("kv-aware", overlap_weight=1.0)
    router.apply_events("a", [Stored(0, PROMPT)])
    load(router, "a", 5)
    # a: 1.0 * 0 + 5 = 5; b, c: 10 + 0.
    assert router.route(PROMPT, request_id="k").member_id == "a"
    router.release("k")
    cheap = setup("kv-aware", overlap_weight=0.1)
    cheap.apply_events("a", [Stored(0, PROMPT)])
    load(cheap, "a", 5)
    # a: 5; b, c: 0.1 * 10 = 1.
    assert cheap.route(PROMPT).member_id in {"b", "c"}
    hot = setup("kv-aware", overlap_weight=1.0, temperature=50.0)
    hot.apply_events("a", [Stored(0, PROMPT)])
    picks: Counter[str] = Counter()
    for i in range(200):
        d = hot.route(PROMPT, request_id=f"t{i}")
        picks[d.member_id] += 1
        hot.release(d.request_id)
    assert len(picks) == 3 and picks["a"] == max(picks.values())


def test_prefix_spreads_a_hot_shared_prefix_but_keeps_long_matches() -> None:
    def hot(router: RouterCore) -> None:
        # Pod b holds a 2-of-10-block "system prompt" and one long 9-block history, and took 8
        # of the last 10 routes, each released at once (nothing in flight: the in-flight gate idles).
        router.apply_events("b", [Stored(0, PROMPT[:2]), Stored(0, [50, 51, 52, 53, 54, 55, 56, 57, 58])])
        for member_id, routes in (("a", 1), ("b", 8), ("c", 1)):
            pod = router.pods.get(member_id)
            assert pod is not None
            for _ in range(routes):
                router.pods.started(pod.slot)
                router.pods.finished(pod.slot)

    router = setup("prefix", share_weight=1.0)
    hot(router)
    new_conversation = router.route(PROMPT, request_id="n")
    assert new_conversation.member_id != "b"  # b holds 20% more of it: not worth its excess share
    next_turn = router.route([50, 51, 52, 53, 54, 55, 56, 57, 58, 59], request_id="t")
    assert (next_turn.member_id, next_turn.matched_blocks) == ("b", 9)  # 90% more: it stays

    pure = setup("prefix", share_weight=0)
    hot(pure)
    assert pure.route(PROMPT).member_id == "b"  # share weight 0: the longest match alone
