"""Request ids the router makes up are unguessable (they were r1, r2, ...: anyone could release them)."""

from __future__ import annotations

from tests.router.helpers import core, joined, member


def test_generated_request_ids_are_random_and_release_works() -> None:
    router = core("prefix")
    router.update_pods(joined(member("a"), member("b")))
    ids = [router.route([i, i + 1]).request_id for i in range(50)]
    assert len(set(ids)) == 50
    assert all(i.startswith("r") and len(i) == 25 for i in ids)  # 96 random bits, hex
    assert "r1" not in ids and "r2" not in ids
    assert len({i[:6] for i in ids}) > 40  # no shared counter or clock prefix
    assert router.release(ids[0]) is True
    assert router.release(ids[0]) is False
    assert router.release("r" + "0" * 24) is False
