"""The in-process pool model and the summary figures."""

from __future__ import annotations

import pytest

from kvmesh.tools.replay.metrics import ReplayResult, RequestRecord
from kvmesh.tools.replay.pool import PoolModel


def test_pool_prefix_hits_stop_at_the_first_miss() -> None:
    p = PoolModel(10)
    p.put([1, 2, 3, 5])
    assert p.prefix_hits([1, 2, 3, 4, 5]) == 3
    assert p.prefix_hits([9, 1]) == 0


def test_pool_evicts_least_recently_used() -> None:
    p = PoolModel(3)
    p.put([1, 2, 3])
    assert p.prefix_hits([1]) == 1  # 1 is now the most recent
    p.put([4])
    assert 2 not in p and 1 in p and len(p) == 3 and p.evictions == 1


def test_zero_pool_holds_nothing() -> None:
    p = PoolModel(0)
    p.put([1])
    assert p.prefix_hits([1]) == 0


def _rec(i: int, engine: str, blocks: int, local: int, pool: int, ttft: float) -> RequestRecord:
    return RequestRecord(f"r{i}", engine, i * 1000.0, blocks * 512, 10, blocks, local, pool, 0.0, ttft, ttft + 100)


def test_summary_figures() -> None:
    res = ReplayResult("prefix", "in-process", ["a", "b"], bound=0.5)
    res.records = [_rec(0, "a", 4, 0, 0, 100.0), _rec(1, "a", 4, 2, 1, 50.0), _rec(2, "b", 2, 1, 0, 10.0)]
    res.inflight_spread = [0, 1, 2]
    s = res.summary()
    assert s["local_hit_rate"] == pytest.approx(3 / 10)
    assert s["pool_hit_rate"] == pytest.approx(1 / 10)
    assert s["fraction_of_bound"] == pytest.approx(0.4 / 0.5)
    assert s["max_over_mean_requests"] == pytest.approx(2 / 1.5)
    assert s["inflight_spread_max"] == 2
    assert s["ttft_p50_ms"] == pytest.approx(50.0)
    xs, local, total, _ = res.hit_rate_over_time(window_s=2.0)
    assert xs == [0.0, 2.0] and local[0] == pytest.approx(2 / 8) and total[1] == pytest.approx(0.5)
