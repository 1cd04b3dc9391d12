"""Per-medium tiers: the medium table, the tree's tier bookkeeping, and weighted scoring in the core."""

from __future__ import annotations

import struct

import pydantic
import pytest

from kvmesh.services.router.core import Cleared, Removed, Retiered, Stored
from kvmesh.services.router.media import MediumTable, parse_weights
from kvmesh.services.router.tree import PrefixTree, tier_of
from tests.router.helpers import core, joined, member, settings

CPU = 1  # tier of "CPU" in the default table


def test_medium_table_defaults_and_unknown_media() -> None:
    t = MediumTable.from_spec()
    assert t.names == ("GPU", "CPU") and t.weights == (1.0, 0.5)
    assert t.bit("GPU") == t.bit("") == t.bit("gpu") == 1
    assert t.bit("CPU") == 2
    other = t.bit("DISK")
    assert other == t.other_bit == 4
    assert t.best_tier(t.bit("CPU")) == CPU
    assert t.best_tier(t.bit("CPU") | 1) == 0  # GPU and CPU: the GPU copy counts
    assert t.best_tier(other) == 0  # an unlisted medium weighs like GPU
    assert t.best_tier(other | t.bit("CPU")) == 0
    custom = MediumTable.from_spec("CPU=0.25,disk=0.1")
    assert custom.names == ("GPU", "CPU", "DISK") and custom.weights == (1.0, 0.25, 0.1)
    assert custom.best_tier(custom.bit("DISK") | custom.bit("CPU")) == 1


@pytest.mark.parametrize("spec", ["GPU", "GPU=x", "=1", "CPU=-1", "CPU=nan", "CPU=1,cpu=2",
                                  ",".join(f"M{i}=1" for i in range(9))])
def test_bad_medium_weights_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        parse_weights(spec)
    with pytest.raises(pydantic.ValidationError):
        settings(kv_medium_weights=spec)


def test_tree_keeps_a_tier_per_pod_and_splits_runs_where_it_changes() -> None:
    tree = PrefixTree(1000)
    chain = list(range(1, 11))
    assert tree.store(0, 0, chain, 1.0, tier=0) == 10
    assert tree.store(1, 0, chain, 1.0, tier=CPU) == 10
    node = tree._index[5]
    assert node.ids == tuple(chain) and tier_of(node, 1) == 0 and tier_of(node, 2) == CPU
    # Pod 0's GPU copies of 4..6 go, a CPU copy stays: one split around the run, not one per id.
    assert tree.retier(0, [4, 5, 6], CPU) == 3
    assert [n.ids for n in (tree._index[1], tree._index[4], tree._index[7])] == [(1, 2, 3), (4, 5, 6), (7, 8, 9, 10)]
    assert tier_of(tree._index[4], 1) == CPU and tier_of(tree._index[7], 1) == 0 and tier_of(tree._index[1], 1) == 0
    assert all(tier_of(tree._index[b], 2) == CPU for b in chain)  # pod 1 untouched by the splits
    assert tree.retier(0, [4, 5, 6], CPU) == 0  # already there
    # Scores: pod 0 holds 3 GPU + 3 CPU + 4 GPU, pod 1 ten CPU blocks.
    weights = (1.0, 0.5)
    m = tree.match(chain, 0b11)
    assert m.matched(1) == m.matched(2) == 10
    assert m.score(1, weights) == 8.5 and m.score(2, weights) == 5.0
    # A prompt that stops inside the CPU run weighs only the matched part of it.
    assert tree.match([1, 2, 3, 4, 5, 99], 0b11).score(1, weights) == 3 + 2 * 0.5
    # Removing a pod's copy forgets its tier: a later GPU store of the same block is GPU again.
    tree.remove(1, [10])
    assert tier_of(tree._index[10], 2) == 0
    tree.store(1, 9, [10], 2.0)
    assert tier_of(tree._index[10], 2) == 0 and tree.match(chain, 0b10).score(2, weights) == 9 * 0.5 + 1
    # Clearing a pod drops every tier bit it had, so its slot starts clean.
    tree.clear(1)
    assert all(n.tiers is None or not any(t & 2 for t in n.tiers) for n in tree._walk())
    tree.retier(0, [4, 5, 6], 0)
    assert all(n.tiers is None for n in tree._walk())  # back to GPU: no tier lists at all


def test_core_prefers_a_gpu_hit_over_a_longer_cpu_only_hit() -> None:
    router = core("prefix")
    router.update_pods(joined(member("a"), member("b")))
    chain = list(range(1, 13))
    router.apply_events("a", [Stored(0, chain[:4])])  # 4 blocks on GPU: worth 4
    router.apply_events("b", [Stored(0, chain[:6], tier=CPU)])  # 6 only on CPU: worth 3
    d = router.route(chain)
    assert (d.member_id, d.matched_blocks) == ("a", 4)
    router.release(d.request_id)
    router.apply_events("b", [Stored(chain[5], chain[6:10], tier=CPU)])  # 10 on CPU: worth 5 > 4
    d = router.route(chain)
    assert (d.member_id, d.matched_blocks) == ("b", 10)  # matched_blocks stays a block count
    router.release(d.request_id)
    router.apply_events("b", [Retiered(chain[:10], 0)])  # loaded back... then evicted on GPU again
    router.apply_events("b", [Retiered(chain[:10], CPU), Removed(chain[6:10])])
    d = router.route(chain)
    assert d.member_id == "a"
    router.release(d.request_id)
    router.apply_events("b", [Cleared()])
    assert router.route(chain).member_id == "a"


def test_medium_weights_flag_changes_the_choice_and_kv_aware_costs_cpu_blocks() -> None:
    for weights, winner in (("GPU=1.0,CPU=0.5", "a"), ("CPU=1.0", "b")):
        router = core("prefix", kv_medium_weights=weights)
        router.update_pods(joined(member("a"), member("b")))
        router.apply_events("a", [Stored(0, [1, 2, 3, 4])])
        router.apply_events("b", [Stored(0, [1, 2, 3, 4, 5, 6], tier=CPU)])
        assert router.route([1, 2, 3, 4, 5, 6, 7, 8]).member_id == winner, weights
    # kv-aware: cost = blocks left to prefill, a CPU-only block counting for half a hit.
    router = core("kv-aware", overlap_weight=1.0)
    router.update_pods(joined(member("a"), member("b")))
    router.apply_events("a", [Stored(0, [1, 2, 3, 4])])  # cost 8 - 4 = 4
    router.apply_events("b", [Stored(0, [1, 2, 3, 4, 5, 6], tier=CPU)])  # cost 8 - 3 = 5 (unweighted: 2)
    assert router.route([1, 2, 3, 4, 5, 6, 7, 8]).member_id == "a"
    # cache-aware: the best weighted match must cover more than --cache-threshold of the prompt.
    router = core("cache-aware", cache_threshold=0.5)
    router.update_pods(joined(member("a"), member("b")))
    router.apply_events("a", [Stored(0, [1, 2, 3, 4, 5, 6], tier=CPU)])  # 6 of 8 blocks, worth 3: 0.375
    router.apply_events("b", [Stored(0, [50])])
    assert router.route([1, 2, 3, 4, 5, 6, 7, 8]).member_id == "b"  # not over the threshold: smallest tree


def test_sharded_map_and_the_per_pod_hash_bound() -> None:
    from kvmesh.services.router.kv_events.decode import EngineHash, EngineStored
    from kvmesh.services.router.kv_events.ingest import EventIngest
    from kvmesh.services.router.shards import ShardedDict

    m: ShardedDict[int, int] = ShardedDict()
    m.update(range(1000), [i * 2 for i in range(1000)])
    assert len(m) == 1000 and m[7] == 14 and 999 in m and m.get(5000) is None
    assert sorted(m) == list(range(1000))
    old = m.oldest(100)
    assert len(old) == 100 and max(old) < 300  # each shard's first keys in turn: among the oldest, not the newest
    del m[7]
    assert m.pop(8) == 16 and 7 not in m and len(m) == 998
    m.clear()
    assert len(m) == 0
    # The ingest's engine-hash map is bounded per pod; what it forgets leaves the tree too.
    router = core("prefix", block_size=2)
    router.update_pods(joined(member("a")))
    ingest = EventIngest(router, max_blocks_per_pod=16)
    hashes: list[EngineHash] = list(range(1, 41))
    ingest.apply("a", [EngineStored(hashes, None, struct.pack("<80I", *range(80)), 2, "GPU")])
    assert len(ingest.stream("a").keys) == 16
    assert router.tree.pod_blocks(router.pods.get("a").slot) == 16  # type: ignore[union-attr]
