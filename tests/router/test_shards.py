"""The sharded maps (`shards.py`, bulk writes in `_shards.c`) behave as one dict, length included."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.services.router import _shards
from kvmesh.services.router.shards import IntShardedDict, ShardedDict

keys = st.integers(-(2**63), 2**64 - 1) | st.binary(max_size=8)
int_keys = st.integers(0, 2**64 - 1)
ops = st.lists(st.one_of(
    st.tuples(st.just("update"), st.lists(st.tuples(keys, st.integers()), max_size=20)),
    st.tuples(st.just("set"), keys, st.integers()),
    st.tuples(st.just("pop"), keys),
    st.tuples(st.just("clear")),
), max_size=40)


@settings(max_examples=200, deadline=None)
@given(ops=ops)
def test_a_sharded_map_is_a_dict(ops: list[tuple]) -> None:
    m: ShardedDict[int | bytes, int] = ShardedDict()
    ref: dict[int | bytes, int] = {}
    for op in ops:
        if op[0] == "update":
            m.update([k for k, _ in op[1]], [v for _, v in op[1]])
            ref.update(op[1])
        elif op[0] == "set":
            m[op[1]] = op[2]
            ref[op[1]] = op[2]
        elif op[0] == "pop":
            if op[1] in ref:
                assert m.pop(op[1]) == ref.pop(op[1])
            else:
                with pytest.raises(KeyError):
                    m.pop(op[1])
        else:
            m.clear()
            ref.clear()
        assert len(m) == len(ref)
    assert dict((k, m[k]) for k in m) == ref


@settings(max_examples=100, deadline=None)
@given(runs=st.lists(st.lists(int_keys, max_size=70), max_size=10), drop=st.lists(int_keys, max_size=10))
def test_put_all_counts_new_ids_only(runs: list[list[int]], drop: list[int]) -> None:
    m: IntShardedDict[str] = IntShardedDict()
    ref: dict[int, str] = {}
    for i, run in enumerate(runs):
        m.put_all(run, f"node{i}")
        ref.update(dict.fromkeys(run, f"node{i}"))
    for k in drop:
        if k in ref:
            del m[k]
            del ref[k]
    assert len(m) == len(ref) and all(m[k] == v for k, v in ref.items()) and set(m) == set(ref)


def test_bad_calls_are_refused_and_change_nothing() -> None:
    shards: list[dict[int, int]] = [{} for _ in range(4)]
    with pytest.raises(ValueError):
        _shards.update(shards, [1, 2], [1], False)
    with pytest.raises(ValueError):
        _shards.fill([{} for _ in range(3)], [1], 0, True)
    with pytest.raises(TypeError):
        _shards.fill([{}, []], [1], 0, True)  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _shards.fill(shards, [[1]], 0, False)  # an unhashable key
    assert shards == [{} for _ in range(4)]
