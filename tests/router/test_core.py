"""RouterCore: routing, load accounting, membership and events through the in-process API."""

from __future__ import annotations

import pytest

from kvmesh.membership import MembershipChange
from kvmesh.runtime.errors import InvalidArgument, Unavailable
from kvmesh.services.router.core import Cleared, Removed, Stored
from tests.router.helpers import FakeClock, core, joined, left, member


def test_no_engine_member_is_unavailable() -> None:
    router = core()
    with pytest.raises(Unavailable):
        router.route([1, 2, 3])


def test_prefix_policy_follows_the_prompt_to_the_pod_that_saw_it() -> None:
    router = core("prefix")
    router.update_pods(joined(member("a"), member("b"), member("c")))
    first = router.route([11, 12, 13, 14], request_id="q1")
    assert first.matched_blocks == 0 and first.total_blocks == 4
    router.release("q1")
    again = router.route([11, 12, 13, 99], request_id="q2")
    assert again.member_id == first.member_id
    assert again.matched_blocks == 3
    assert again.policy == "prefix"


def test_chain_is_respected_a_known_id_in_another_position_does_not_match() -> None:
    router = core("prefix")
    router.update_pods(joined(member("a"), member("b")))
    d = router.route([1, 2, 3])
    assert router.tree.parent_of(2) == 1
    # 2 exists in the tree but under parent 1, not at the root.
    assert router.route([2, 3]).matched_blocks == 0
    assert router.route([1, 2, 3]).matched_blocks == 3
    assert d.matched_blocks == 0


def test_inflight_load_counts_until_release_and_retries_count_once() -> None:
    router = core("least-load")
    router.update_pods(joined(member("a"), member("b")))
    d1 = router.route([], request_id="x")
    d2 = router.route([], request_id="y")
    assert {d1.member_id, d2.member_id} == {"a", "b"}
    router.route([], request_id="x")  # retry of x: still one request
    assert router.inflight("a") + router.inflight("b") == 2
    assert router.release("x") and router.release("y")
    assert not router.release("x")
    assert router.inflight("a") == router.inflight("b") == 0


def test_empty_request_id_gets_one_so_it_can_be_released() -> None:
    router = core()
    router.update_pods(joined(member("a")))
    d = router.route([5])
    assert d.request_id
    assert router.inflight("a") == 1
    assert router.release(d.request_id)
    assert router.inflight("a") == 0


def test_reported_load_from_updates_steers_least_load() -> None:
    router = core("least-load")
    router.update_pods(joined(member("a", running=5), member("b", running=1, waiting=1)))
    assert router.route([]).member_id == "b"
    router.update_pods(MembershipChange(revision=2, updated=[member("b", running=9)]))
    assert router.route([]).member_id == "a"


def test_leave_removes_pod_from_every_node_and_it_is_never_chosen() -> None:
    router = core("prefix", rejoin_grace_seconds=0)
    a, b = member("a"), member("b")
    router.update_pods(joined(a, b))
    for i in range(20):
        router.route([i, 1000 + i, 2000 + i])
    slot_a = router.pods.get("a").slot  # type: ignore[union-attr]
    router.update_pods(left(a))
    assert all(not (router.tree.holders(bid) >> slot_a) & 1 for bid in router.tree.block_ids())
    for i in range(50):
        assert router.route([i, 1000 + i, 2000 + i]).member_id == "b"


def test_same_size_swap_reuses_the_slot_without_inheriting_blocks() -> None:
    router = core("prefix")
    a, b = member("a"), member("b")
    router.update_pods(joined(a, b))
    for i in range(10):
        router.route([i, i + 100], request_id=f"r{i}")
    c = member("c", port=9100)
    router.update_pods(MembershipChange(revision=3, left=[a], joined=[c]))
    pod_c = router.pods.get("c")
    assert pod_c is not None
    assert router.tree.pod_blocks(pod_c.slot) == 0
    assert router.inflight("c") == 0
    for i in range(10):
        router.release(f"r{i}")  # releases of a's requests must not touch c's count
    assert router.inflight("c") == 0
    assert {router.route([i]).member_id for i in range(200, 260)} <= {"b", "c"}


def test_model_filter_prefers_pods_serving_the_model() -> None:
    router = core("least-load")
    router.update_pods(joined(member("a", model="llama"), member("b", model="qwen")))
    assert {router.route([], model="qwen").member_id for _ in range(10)} == {"b"}
    assert router.inflight("b") == 10
    # Nobody serves it: any pod (here the least loaded).
    assert router.route([], model="other").member_id == "a"
    assert router.route([], model="").member_id == "a"


def test_precise_events_replace_guesses() -> None:
    clock = FakeClock()
    router = core("prefix", clock=clock)
    router.update_pods(joined(member("a"), member("b")))
    result = router.apply_events("a", [Stored(0, [1, 2, 3]), Stored(3, [4]), Removed([4])])
    assert (result.applied, result.ignored) == (3, 0)
    d = router.route([1, 2, 3, 4])
    assert d.member_id == "a" and d.matched_blocks == 3
    # Precise pods are not assumed to hold what they were sent.
    assert router.tree.holders(4) == 0
    router.apply_events("a", [Cleared()])
    assert router.route([1, 2, 3]).matched_blocks == 0


def test_events_from_unknown_member_or_orphan_chain_are_ignored() -> None:
    router = core()
    router.update_pods(joined(member("a")))
    r = router.apply_events("ghost", [Stored(0, [1])])
    assert (r.applied, r.ignored) == (0, 1) and "unknown member" in r.reason
    r = router.apply_events("a", [Stored(777, [1, 2])])
    assert (r.applied, r.ignored) == (0, 1)
    assert 1 not in router.tree


def test_approximate_blocks_expire_after_ttl() -> None:
    clock = FakeClock()
    router = core("prefix", clock=clock, approx_ttl_seconds=10)
    router.update_pods(joined(member("a"), member("b")))
    d = router.route([1, 2, 3])
    clock.now += 5
    assert router.expire_pod(d.member_id) == 0
    clock.now += 6
    assert router.expire_pod(d.member_id) == 3
    assert len(router.tree) == 0


def test_stale_inflight_requests_are_forgotten() -> None:
    clock = FakeClock()
    router = core("least-load", clock=clock, inflight_timeout_seconds=30)
    router.update_pods(joined(member("a")))
    router.route([], request_id="old")
    clock.now += 20
    router.route([], request_id="new")
    clock.now += 15
    assert router.sweep_requests() == 1
    assert router.inflight("a") == 1


def test_bad_ids_are_invalid_and_change_nothing() -> None:
    router = core()
    router.update_pods(joined(member("a")))
    with pytest.raises(InvalidArgument):
        router.route([1, -2])
    with pytest.raises(InvalidArgument):
        router.route([1 << 64])
    with pytest.raises(InvalidArgument):
        router.route_tokens([1, 2, 1 << 33] * 16)
    with pytest.raises(InvalidArgument):
        router.route(list(range(70_000)))
    assert len(router.tree) == 0 and router.routed == 0


def test_tokens_and_text_are_hashed_into_full_blocks() -> None:
    router = core("prefix", block_size=4, text_block_bytes=8)
    router.update_pods(joined(member("a"), member("b")))
    d = router.route_tokens(list(range(10)), model="m")
    assert d.total_blocks == 2
    again = router.route_tokens([*list(range(8)), 50, 51, 52, 53], model="m")
    assert again.member_id == d.member_id and again.matched_blocks == 2
    # Another model hashes differently.
    assert router.route_tokens(list(range(8)), model="other").matched_blocks == 0
    t = router.route_text("x" * 20)
    assert t.total_blocks == 2


def test_empty_prompt_is_routed_by_load() -> None:
    router = core("prefix")
    router.update_pods(joined(member("a"), member("b")))
    picks = [router.route([]).member_id for _ in range(4)]
    assert picks.count("a") == 2 and picks.count("b") == 2


def test_a_member_that_leaves_and_rejoins_within_the_grace_window_keeps_its_tree() -> None:
    clock = FakeClock()
    router = core("prefix", clock=clock, rejoin_grace_seconds=30)
    a, b = member("a"), member("b")
    router.update_pods(joined(a, b))
    first = router.route([1, 2, 3, 4], request_id="q1")
    holder = member(first.member_id)
    other = "b" if first.member_id == "a" else "a"
    router.update_pods(left(holder))
    assert router.stats().members == 1 and router.stats().members_in_grace == 1
    for i in range(20):  # not a candidate while a live pod exists
        assert router.route([1, 2, 3, 4], request_id=f"x{i}").member_id == other
    clock.now += 10
    router.update_pods(joined(holder))  # same id and address: the tree comes back with it
    router.update_pods(left(member(other)))
    again = router.route([1, 2, 3, 4], request_id="q2")
    assert again.member_id == holder.id and again.matched_blocks == 4


def test_a_rejoin_under_another_address_starts_with_an_empty_tree() -> None:
    router = core("prefix", rejoin_grace_seconds=30)
    a = member("a", port=9000)
    router.update_pods(joined(a))
    router.route([1, 2, 3], request_id="q1")
    router.update_pods(left(a))
    router.update_pods(joined(member("a", port=9999)))
    assert router.route([1, 2, 3], request_id="q2").matched_blocks == 0


def test_with_every_member_gone_the_departed_serve_until_the_grace_ends() -> None:
    clock = FakeClock()
    router = core("prefix", clock=clock, rejoin_grace_seconds=30)
    a, b = member("a"), member("b")
    router.update_pods(joined(a, b))
    first = router.route([5, 6, 7], request_id="q1")
    router.update_pods(left(a, b))  # a metadata flicker: everyone leaves at once
    kept = router.route([5, 6, 7], request_id="q2")  # no UNAVAILABLE, and the match is kept
    assert kept.member_id == first.member_id and kept.matched_blocks == 3
    clock.now += 31
    assert router.expire_departed() == 2
    with pytest.raises(Unavailable):
        router.route([5, 6, 7], request_id="q3")
    assert router.stats().members_in_grace == 0 and len(router.tree) == 0


def test_strings_a_client_sends_are_bounded_and_in_flight_entries_too() -> None:
    router = core("prefix", max_request_id_bytes=64, max_model_bytes=32, max_inflight_requests=100)
    router.update_pods(joined(member("a")))
    with pytest.raises(InvalidArgument, match="--max-request-id-bytes"):
        router.route([1], request_id="r" * 65)
    with pytest.raises(InvalidArgument, match="--max-request-id-bytes"):
        router.route([1], request_id="é" * 33)  # 66 UTF-8 bytes
    with pytest.raises(InvalidArgument, match="--max-model-bytes"):
        router.route_tokens(list(range(32)), model="m" * 33)
    with pytest.raises(InvalidArgument, match="--max-model-bytes"):
        router.route_text("hello " * 20, model="m" * 33)
    for i in range(1000):
        router.route([i], request_id=f"r{i}")
    assert router.stats().inflight == 100 and router.inflight("a") == 100
