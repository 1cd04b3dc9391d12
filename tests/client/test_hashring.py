"""The consistent-hash ring: spread, capacity weights, replicas, and minimal movement."""

from __future__ import annotations

import os
from collections import Counter

from kvmesh.client.hashring import HashRing

KEYS = [os.urandom(16) for _ in range(20_000)]


def test_keys_spread_evenly_over_equal_nodes() -> None:
    ring = HashRing({f"n{i}": 100 for i in range(4)})
    counts = Counter(ring.lookup(k)[0] for k in KEYS)
    assert set(counts) == {"n0", "n1", "n2", "n3"}
    for n in counts.values():
        assert abs(n - len(KEYS) / 4) < len(KEYS) / 4 * 0.25  # within 25% of a fair share


def test_capacity_weights_the_share() -> None:
    ring = HashRing({"small": 1, "big": 3})
    counts = Counter(ring.lookup(k)[0] for k in KEYS)
    assert 2.3 < counts["big"] / counts["small"] < 3.9


def test_replicas_are_distinct_and_stable() -> None:
    ring = HashRing({f"n{i}": 1 for i in range(5)})
    for k in KEYS[:500]:
        owners = ring.lookup(k, replicas=3)
        assert len(owners) == len(set(owners)) == 3
        assert ring.lookup(k, replicas=1) == owners[:1]
    assert HashRing({"only": 1}).lookup(KEYS[0], replicas=3) == ["only"]
    assert HashRing({}).lookup(KEYS[0]) == []


def test_a_joining_node_moves_about_one_nth_of_keys() -> None:
    before = HashRing({f"n{i}": 1 for i in range(4)})
    after = HashRing({f"n{i}": 1 for i in range(5)})
    moved = [k for k in KEYS if before.lookup(k)[0] != after.lookup(k)[0]]
    assert all(after.lookup(k)[0] == "n4" for k in moved)  # keys only move to the new node
    assert 0.12 < len(moved) / len(KEYS) < 0.28  # about 1/5


def test_a_leaving_node_moves_only_its_keys() -> None:
    before = HashRing({f"n{i}": 1 for i in range(5)})
    after = HashRing({f"n{i}": 1 for i in range(4)})
    for k in KEYS[:5000]:
        if before.lookup(k)[0] != "n4":
            assert after.lookup(k)[0] == before.lookup(k)[0]
