"""The router's per-block maps (`shards.py`, `_shards.c`) behave as dicts, lengths included."""

from __future__ import annotations

import gc
import sys
import weakref
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.services.router import _shards
from kvmesh.services.router.shards import BlockIndex, ShardedDict

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


class Held:
    """A value that can be weakly referenced (tree nodes are such objects)."""


index_ops = st.lists(st.one_of(
    st.tuples(st.just("put_all"), st.lists(st.integers(0, 3000) | st.integers(0, 2**64 - 1), max_size=80),
              st.integers(0, 3)),
    st.tuples(st.just("remove_all"), st.lists(st.integers(0, 3000), max_size=80), st.integers(0, 3)),
    st.tuples(st.just("del"), st.integers(0, 3000), st.just(0)),
    st.tuples(st.just("clear"), st.just([]), st.just(0)),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops=index_ops)
def test_the_block_index_is_a_dict_of_ids(ops: list[tuple[str, Any, int]]) -> None:
    # Thousands of ids in 256 small tables: probe chains form, and deletions inside them must
    # leave every other id findable (backward-shift deletion).
    values = [Held() for _ in range(4)]
    index: BlockIndex[Held] = BlockIndex()
    ref: dict[int, Held] = {}
    for op, arg, v in ops:
        if op == "put_all":
            index.put_all(arg, values[v])
            ref.update(dict.fromkeys(arg, values[v]))
        elif op == "remove_all":
            gone = [k for k in dict.fromkeys(arg) if ref.get(k) is values[v]]
            assert index.remove_all(arg, values[v]) == len(gone)
            for k in gone:
                del ref[k]
        elif op == "del":
            if arg in ref:
                del index[arg]
                del ref[arg]
            else:
                with pytest.raises(KeyError):
                    del index[arg]
        else:
            index.clear()
            ref.clear()
        assert len(index) == len(ref)
    assert sorted(index.ids()) == sorted(ref)
    assert all(index.get(k) is v and index[k] is v and k in index for k, v in ref.items())
    assert index.get(2**64 - 5, "none") == "none" or 2**64 - 5 in ref


def test_ids_stay_findable_when_their_neighbours_go() -> None:
    index: BlockIndex[Held] = BlockIndex()
    a, b = Held(), Held()
    index.put_all(range(0, 20_000, 2), a)
    index.put_all(range(1, 20_000, 2), b)
    assert index.remove_all(range(20_000), a) == 10_000  # deletions all through the probe chains
    assert len(index) == 10_000 and all(index.get(i) is b for i in range(1, 20_000, 2))
    assert not any(i in index for i in range(0, 20_000, 2))


def test_the_index_keeps_values_alive_without_the_collector_seeing_it() -> None:
    index: BlockIndex[Held] = BlockIndex()
    held = Held()
    watch = weakref.ref(held)
    index.put_all(range(1000), held)
    del held
    gc.collect()
    assert watch() is not None  # alive while indexed
    assert not gc.is_tracked(index) and gc.get_referents(index) == []  # never visited by a collection
    alive = watch()
    assert alive is not None and index.remove_all(range(999), alive) == 999 and len(index) == 1
    del alive
    del index[999]
    assert watch() is None  # the last reference went with the last id


def test_the_index_refuses_what_is_not_a_block_id() -> None:
    index: BlockIndex[Held] = BlockIndex()
    for bad in (-1, 2**64, "7", 1.0):
        with pytest.raises((TypeError, OverflowError)):
            index.put_all([bad], Held())  # type: ignore[list-item]
        assert bad not in index
    assert len(index) == 0


def test_bad_calls_are_refused_and_change_nothing() -> None:
    shards: list[dict[int, int]] = [{} for _ in range(4)]
    with pytest.raises(ValueError):
        _shards.update(shards, [1, 2], [1])
    with pytest.raises(ValueError):
        _shards.update([{} for _ in range(3)], [1], [0])
    with pytest.raises(TypeError):
        _shards.update([{}, []], [1], [0])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        _shards.update(shards, [[1]], [0])  # an unhashable key
    assert shards == [{} for _ in range(4)]


def test_shards_resize_one_at_a_time_even_for_counted_keys() -> None:
    # An engine numbering its blocks 1, 2, 3... spreads them evenly: equal shards would all
    # resize within the same few 16-block events (a pause of 64 resizes at once).
    m: ShardedDict[int, int] = ShardedDict()
    shards = m._shards
    sizes = [sys.getsizeof(d) for d in shards]
    most = 0
    for start in range(0, 200_000, 16):
        m.update(range(start, start + 16), [0] * 16)
        now = [sys.getsizeof(d) for d in shards]
        if start >= 20_000:  # (small shards growing together cost nothing)
            most = max(most, sum(a != b for a, b in zip(sizes, now, strict=True)))
        sizes = now
    assert len(m) == 200_000 and most <= 3  # equal shards: 16 (every shard an event touches)
