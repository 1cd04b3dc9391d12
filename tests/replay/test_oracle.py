"""The oracle router of the in-process replay reads the engines' real caches."""

from __future__ import annotations

import pytest

from kvmesh.tools.replay.core_router import CoreRouter
from kvmesh.tools.replay.oracle import OracleRouter
from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process
from kvmesh.tools.workload.trace import TraceRequest


def conversations(n: int, turns: int) -> list[TraceRequest]:
    """`n` conversations, each turn extending its conversation's previous prompt by two blocks."""
    out = []
    for turn in range(turns):
        for c in range(n):
            blocks = tuple(c * 1000 + b for b in range(4 + 2 * turn))
            out.append(TraceRequest(timestamp_ms=(turn * n + c) * 2000.0, input_length=len(blocks) * 512,
                                    output_length=4, hash_ids=blocks))
    return out


def test_oracle_finds_every_cached_prefix_and_random_does_not() -> None:
    requests = conversations(6, 4)
    config = ReplayConfig(engines=3, capacity_blocks=1000)
    oracle = replay_in_process(requests, OracleRouter(), "oracle", config).summary()
    random = replay_in_process(requests, CoreRouter("random", seed=1), "random", config).summary()
    # Requests are spaced out (no load), caches are big: every later turn hits its whole earlier prompt.
    later = sum(len(r.hash_ids) - 2 for r in requests[6:])
    total = sum(len(r.hash_ids) for r in requests)
    assert float(oracle["total_hit_rate"]) == later / total
    assert float(random["total_hit_rate"]) < float(oracle["total_hit_rate"])


def test_oracle_without_engines_refuses() -> None:
    router = OracleRouter()
    router.set_engines(["a"])
    with pytest.raises(RuntimeError, match="engines"):
        router.route("r", [1], 0.0)
