"""Trace loading, the infinite-cache bound and the built-in workload generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmesh.tools.workload.generator import WorkloadSpec, generate_workload
from kvmesh.tools.workload.trace import TraceError, TraceRequest, infinite_cache_bound, load_trace, write_trace

SHARED_TRACE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "mooncake_conversation_trace.jsonl"


def test_load_sorts_limits_and_round_trips(tmp_path: Path) -> None:
    reqs = [TraceRequest(20.0, 600, 5, (0, 1)), TraceRequest(10.0, 100, 1, (0,))]
    path = tmp_path / "t.jsonl"
    write_trace(path, reqs)
    with open(path, "a") as f:
        f.write("\n")  # blank lines are skipped
    loaded = load_trace(path)
    assert [r.timestamp_ms for r in loaded] == [10.0, 20.0]
    assert loaded[1] == reqs[0]
    assert len(load_trace(path, limit=1)) == 1


@pytest.mark.parametrize(
    "line",
    ['{"timestamp": 0}', "not json", '{"timestamp": -1, "input_length": 5, "output_length": 1, "hash_ids": [1]}',
     '{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [-3]}'],
)
def test_bad_lines_name_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n' + line + "\n")
    with pytest.raises(TraceError, match="line 2"):
        load_trace(path)


def test_infinite_cache_bound_counts_repeated_blocks() -> None:
    reqs = [TraceRequest(0, 1, 1, (1, 2)), TraceRequest(1, 1, 1, (1, 2, 3)), TraceRequest(2, 1, 1, (4,))]
    assert infinite_cache_bound(reqs) == pytest.approx(2 / 6)
    assert infinite_cache_bound([]) == 0.0


@pytest.mark.skipif(not SHARED_TRACE.exists(), reason="the shared trace is not in this checkout")
def test_shared_trace_bound() -> None:
    reqs = load_trace(SHARED_TRACE)
    assert len(reqs) == 12031
    assert infinite_cache_bound(reqs) == pytest.approx(0.3664, abs=1e-3)


def test_generator_is_deterministic_and_shaped_like_conversations() -> None:
    spec = WorkloadSpec(conversations=30, seed=7)
    a = generate_workload(spec)
    assert a == generate_workload(spec)
    assert a != generate_workload(WorkloadSpec(conversations=30, seed=8))
    assert [r.timestamp_ms for r in a] == sorted(r.timestamp_ms for r in a)
    firsts = {r.hash_ids[: spec.system_prompt_blocks] for r in a}
    assert len(firsts) <= spec.system_prompts  # every prompt opens on a shared system prompt
    for r in a:
        assert (len(r.hash_ids) - 1) * spec.block_tokens < r.input_length <= len(r.hash_ids) * spec.block_tokens
    # Multi-turn: some prompt extends another one by whole blocks.
    prefixes = {r.hash_ids for r in a}
    assert any(r.hash_ids[:-2] in prefixes for r in a if len(r.hash_ids) > spec.system_prompt_blocks + 2)
    # Tool use: two requests at the same moment share all but their last block.
    by_time: dict[float, list[TraceRequest]] = {}
    for r in a:
        by_time.setdefault(r.timestamp_ms, []).append(r)
    assert any(len(g) > 1 and len({x.hash_ids[:-1] for x in g}) == 1 for g in by_time.values())
    assert infinite_cache_bound(a) > 0.5
