"""The batching engine on a virtual clock: latencies follow the timing model, hits skip compute."""

from __future__ import annotations

import pytest

from kvmesh.services.enginesim.engine import BatchingEngine, EngineEvent, EventKind, SimRequest
from kvmesh.services.enginesim.timing import TimingModel, attention_pairs

BT = 512


def _engine(capacity: int = 100, **timing: float) -> BatchingEngine:
    return BatchingEngine(TimingModel(**timing), capacity, BT)  # type: ignore[arg-type]


def _request(rid: str, blocks: list[int], out: int = 10, tokens: int | None = None) -> SimRequest:
    return SimRequest(rid, blocks, tokens or len(blocks) * BT, out, 0.0)


def _run(engine: BatchingEngine, request: SimRequest, at: float = 0.0, pool: int = 0) -> list[EngineEvent]:
    engine.run_until(at)
    engine.submit(request, at, engine.lookup(request.blocks), pool)
    return engine.run_until(float("inf"))


def test_single_request_latency_matches_the_model() -> None:
    e = _engine()
    r = _request("a", [1, 2, 3, 4], out=5)
    events = _run(e, r)
    m = e.timing
    prefill = m.step_ms(4 * BT, attention_pairs(0, 4 * BT))
    assert r.ttft_ms == pytest.approx(prefill)
    # 4 more tokens, one per decode step over a growing context (averaged in one run).
    decode = m.step_ms(decode_seqs=1, decode_context_tokens=4 * BT + 2.5)
    assert r.e2e_ms == pytest.approx(prefill + 4 * decode, rel=1e-3)
    kinds = [ev.kind for ev in events]
    assert kinds == [EventKind.FIRST_TOKEN, EventKind.STORED, EventKind.FINISHED]
    assert events[1].blocks == [1, 2, 3, 4]


def test_local_hit_skips_prefill_and_is_counted() -> None:
    e = _engine()
    first = _request("a", [1, 2, 3, 4])
    _run(e, first)
    second = _request("b", [1, 2, 3, 4, 5, 6])
    _run(e, second, at=first.finish_ms or 0)
    assert second.local_hit_blocks == 4 and second.computed_blocks == 2
    fresh = _request("c", [7, 8, 9, 10, 11, 12])
    _run(_engine(), fresh)
    assert second.ttft_ms < fresh.ttft_ms / 2


def test_full_hit_still_computes_the_last_token() -> None:
    e = _engine()
    _run(e, _request("a", [1, 2]))
    again = _request("b", [1, 2])
    _run(e, again, at=1e6)
    assert again.local_hit_blocks == 2
    assert again.cached_tokens == 2 * BT - 1
    assert again.ttft_ms == pytest.approx(e.timing.step_ms(1, attention_pairs(2 * BT - 1, 2 * BT)))


def test_pool_hits_cost_the_transfer_time_instead_of_compute() -> None:
    pooled = _request("p", [1, 2, 3, 4, 5, 6, 7, 8])
    _run(_engine(), pooled, pool=6)
    cold = _request("c", [1, 2, 3, 4, 5, 6, 7, 8])
    _run(_engine(), cold)
    assert pooled.pool_hit_blocks == 6 and pooled.computed_blocks == 2
    assert pooled.ready_ms == pytest.approx(TimingModel().pool_fetch_ms(6 * BT))
    assert pooled.ttft_ms < cold.ttft_ms / 2


def test_chunked_prefill_spreads_a_long_prompt_over_steps() -> None:
    e = _engine(capacity=100, max_batched_tokens=1024)
    r = _request("a", list(range(8)), out=1)
    _run(e, r)
    assert e.steps == 4  # 4096 tokens in chunks of 1024


def test_queueing_when_memory_is_full() -> None:
    e = _engine(capacity=10)
    a = _request("a", list(range(8)), out=200)
    b = _request("b", list(range(100, 108)), out=5)
    e.submit(a, 0.0, 0)
    e.submit(b, 0.0, 0)
    e.run_until(float("inf"))
    assert b.admitted_ms is not None and a.finish_ms is not None
    assert b.admitted_ms >= a.finish_ms  # b waited for a's blocks to be freed
    assert b.queue_ms > 0


def test_continuous_batching_overlaps_requests() -> None:
    e = _engine()
    rs = [_request(f"r{i}", [i * 10 + j for j in range(2)], out=50) for i in range(4)]
    for r in rs:
        e.submit(r, 0.0, 0)
    e.run_until(float("inf"))
    alone = _request("x", [999, 998], out=50)
    _run(_engine(), alone)
    makespan = max(r.finish_ms or 0 for r in rs)
    assert makespan < 2 * alone.e2e_ms  # four requests batched take far less than 4x one
    assert all(r.finish_ms is not None for r in rs)


def test_arrivals_interrupt_a_decode_run() -> None:
    e = _engine()
    long = _request("long", [1], out=1000)
    e.submit(long, 0.0, 0)
    e.run_until(500.0)
    assert long.finish_ms is None and long.generated < 1000
    late = _request("late", [2], out=1)
    e.submit(late, 500.0, 0)
    e.run_until(float("inf"))
    assert late.first_token_ms is not None and long.finish_ms is not None
    assert late.first_token_ms < long.finish_ms  # it did not wait for the whole run
    assert late.queue_ms < 50.0


def test_evictions_are_reported() -> None:
    e = _engine(capacity=4)
    _run(e, _request("a", [1, 2], out=1))
    events = _run(e, _request("b", [3, 4, 5], out=1), at=1e5)
    removed = [ev for ev in events if ev.kind is EventKind.REMOVED]
    assert removed and removed[0].blocks == [2, 1]  # 3 new blocks + 1 decode block need all 4, tail first


def test_hits_are_counted_when_scheduled_not_when_arrived() -> None:
    e = _engine(capacity=8)  # a holds 7 blocks while it runs; b needs 2 more than the one left
    a = _request("a", [1, 2, 3, 4, 5, 6], out=30)
    b = _request("b", [1, 2, 3, 4, 5, 6, 7], out=5)
    e.submit(a, 0.0, e.lookup(a.blocks))
    e.submit(b, 0.0, e.lookup(b.blocks))  # nothing cached yet when it arrives
    e.run_until(float("inf"))
    assert b.admitted_ms is not None and a.finish_ms is not None and b.admitted_ms >= a.finish_ms
    assert b.local_hit_blocks == 6 and b.computed_blocks == 1  # a computed them while b waited
