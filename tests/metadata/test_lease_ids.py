"""Lease ids cannot be guessed: random 63-bit positive numbers on memory:// and redis://
(they were the start time in microseconds plus one per lease). etcd's are etcd's own."""

from __future__ import annotations

import itertools

import pytest

from kvmesh.services.metadata.stores.base import MAX_LEASE_ID, LeaseNotFound
from kvmesh.services.metadata.stores.registry import open_store
from tests.metadata.conftest import backend_uri


@pytest.mark.parametrize("name", ["memory", "redis"])
async def test_lease_ids_are_random_and_still_work(request: pytest.FixtureRequest, name: str) -> None:
    store = await open_store(backend_uri(request, name))
    await store.start()
    try:
        ids = [(await store.grant(30))[0] for _ in range(40)]
        assert len(set(ids)) == len(ids)
        assert all(0 < i <= MAX_LEASE_ID for i in ids)
        # Sequential ids would be sorted with steps of 1; random ones are neither (40! orders).
        assert ids != sorted(ids)
        assert len({b - a for a, b in itertools.pairwise(ids)}) > 1
        assert max(ids) - min(ids) > 2**50  # spread over the 63-bit range, not near one clock value
        # Large ids survive the round trip (Redis' Lua numbers are doubles: ids stay strings there).
        top = max(ids)
        await store.put("k", b"v", top)
        entry = await store.get("k")
        assert entry is not None and entry.lease_id == top
        assert await store.refresh(top) == 30
        await store.revoke(top)
        assert await store.get("k") is None
        with pytest.raises(LeaseNotFound):
            await store.refresh(top)
        with pytest.raises(LeaseNotFound):  # a neighbour of a live id is not live
            await store.refresh(ids[0] + 1 if ids[0] + 1 not in ids else ids[0] - 1)
    finally:
        await store.close()
