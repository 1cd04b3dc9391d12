"""What a replay measures, and the summary figures computed from it.

Each finished request leaves one `RequestRecord` (which engine served it, how many of its
prompt blocks came from the engine's own cache, from the pool, or were computed, and its
simulated latencies). At every routing decision the in-flight count per engine is sampled,
which gives the spread of in-flight requests. Both replay modes produce the same records, so
the in-process and the live figures are directly comparable.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    request_id: str
    engine: str
    arrival_ms: float
    input_tokens: int
    output_tokens: int
    prompt_blocks: int
    local_hit_blocks: int
    pool_hit_blocks: int
    queue_ms: float
    ttft_ms: float
    e2e_ms: float
    ideal_hit_blocks: int = 0  # what one infinite cache would have served

    @property
    def computed_blocks(self) -> int:
        return max(self.prompt_blocks - self.local_hit_blocks - self.pool_hit_blocks, 0)


@dataclass
class ReplayResult:
    """Everything one replay of one policy produced."""

    policy: str
    mode: str
    engines: list[str]
    records: list[RequestRecord] = field(default_factory=list)
    inflight_spread: list[int] = field(default_factory=list)  # max - min in flight, per decision
    bound: float = 0.0
    wall_s: float = 0.0
    settings: dict[str, object] = field(default_factory=dict)

    def summary(self) -> dict[str, float | int | str]:
        return summarize(self)

    def hit_rate_over_time(
        self, window_s: float = 60.0
    ) -> tuple[list[float], list[float], list[float], list[float]]:
        """(window start in s, local, total and infinite-cache hit rates) per window of arrivals."""
        if not self.records:
            return [], [], [], []
        step = window_s * 1000.0
        buckets: dict[int, list[int]] = {}
        for r in self.records:
            b = buckets.setdefault(int(r.arrival_ms // step), [0, 0, 0, 0])
            b[0] += r.prompt_blocks
            b[1] += r.local_hit_blocks
            b[2] += r.local_hit_blocks + r.pool_hit_blocks
            b[3] += r.ideal_hit_blocks
        keys = sorted(buckets)
        xs = [k * window_s for k in keys]
        local = [buckets[k][1] / max(buckets[k][0], 1) for k in keys]
        total = [buckets[k][2] / max(buckets[k][0], 1) for k in keys]
        ideal = [buckets[k][3] / max(buckets[k][0], 1) for k in keys]
        return xs, local, total, ideal

    def to_json(self) -> dict[str, object]:
        return {
            "policy": self.policy,
            "mode": self.mode,
            "engines": self.engines,
            "settings": self.settings,
            "summary": self.summary(),
            "hit_rate_over_time": dict(
                zip(("t_s", "local", "total", "infinite_cache"), self.hit_rate_over_time(), strict=True)
            ),
            "requests": [asdict(r) for r in self.records],
        }


def _pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else 0.0


def summarize(result: ReplayResult) -> dict[str, float | int | str]:
    """The figures of the summary table, as plain numbers."""
    recs = result.records
    blocks = sum(r.prompt_blocks for r in recs)
    local = sum(r.local_hit_blocks for r in recs)
    pool = sum(r.pool_hit_blocks for r in recs)
    per_engine = Counter(r.engine for r in recs)
    counts = [per_engine.get(e, 0) for e in result.engines] or [0]
    mean = sum(counts) / len(counts)
    start = min((r.arrival_ms for r in recs), default=0.0)
    end = max((r.arrival_ms + r.e2e_ms for r in recs), default=0.0)
    span_s = max((end - start) / 1000.0, 1e-9)
    total_rate = (local + pool) / blocks if blocks else 0.0
    ttfts = [r.ttft_ms for r in recs]
    return {
        "policy": result.policy,
        "mode": result.mode,
        "requests": len(recs),
        "prompt_blocks": blocks,
        "local_hit_rate": local / blocks if blocks else 0.0,
        "pool_hit_rate": pool / blocks if blocks else 0.0,
        "total_hit_rate": total_rate,
        "infinite_cache_bound": result.bound,
        "fraction_of_bound": total_rate / result.bound if result.bound else 0.0,
        "local_fraction_of_bound": (local / blocks / result.bound) if blocks and result.bound else 0.0,
        "ttft_p50_ms": _pct(ttfts, 50),
        "ttft_p99_ms": _pct(ttfts, 99),
        "queue_p99_ms": _pct([r.queue_ms for r in recs], 99),
        "e2e_p50_ms": _pct([r.e2e_ms for r in recs], 50),
        "throughput_req_s": len(recs) / span_s,
        "throughput_prompt_tok_s": sum(r.input_tokens for r in recs) / span_s,
        "throughput_output_tok_s": sum(r.output_tokens for r in recs) / span_s,
        "computed_prompt_blocks": sum(r.computed_blocks for r in recs),
        "max_over_mean_requests": max(counts) / mean if mean else 0.0,
        "inflight_spread_mean": float(np.mean(result.inflight_spread)) if result.inflight_spread else 0.0,
        "inflight_spread_max": max(result.inflight_spread, default=0),
        "simulated_s": span_s,
        "wall_s": result.wall_s,
    }
