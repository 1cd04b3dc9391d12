"""In-flight requests belong to whoever routed them (`owner`): only that owner releases one, ids of
different owners never meet, and the bounds (sweep, --max-inflight-requests) still hold."""

from __future__ import annotations

from tests.router.helpers import FakeClock, core, joined, member


def test_release_by_another_owner_changes_nothing() -> None:
    c = core()
    c.update_pods(joined(member("e0")))
    rid = c.route([1, 2, 3], owner="alice").request_id
    assert not c.release(rid, owner="bob")
    assert not c.release(rid)  # the owner "" (no policy) is just another owner
    assert c.inflight("e0") == 1
    assert c.release(rid, owner="alice")
    assert c.inflight("e0") == 0


def test_the_same_id_under_two_owners_is_two_requests() -> None:
    c = core()
    c.update_pods(joined(member("e0")))
    c.route([1], request_id="req-1", owner="alice")
    c.route([1], request_id="req-1", owner="bob")
    c.route([1], request_id="req-1", owner="bob")  # bob's retry: counted once
    assert c.inflight("e0") == 2
    assert c.release("req-1", owner="bob")
    assert c.inflight("e0") == 1
    assert c.release_any("req-1")  # an admin's release: whoever routed it
    assert c.inflight("e0") == 0
    assert not c.release_any("req-1")


def test_bounds_hold_across_owners() -> None:
    clock = FakeClock()
    c = core(clock=clock, max_inflight_requests=16, inflight_timeout_seconds=10)
    c.update_pods(joined(member("e0")))
    for i in range(20):
        c.route([i + 1], owner=f"p{i % 3}")
    assert c.stats().inflight == 16 and c.inflight("e0") == 16
    clock.now += 11
    assert c.sweep_requests() == 16
    assert c.stats().inflight == 0 and c.inflight("e0") == 0
