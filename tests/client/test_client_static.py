"""The client over a static node list of in-process cache nodes: batches, replicas, dead nodes."""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from kvmesh.client import CacheClient, NodeInfo
from kvmesh.tools.testing.mesh import MeshHandle, local_mesh


@contextlib.asynccontextmanager
async def nodes(count: int) -> AsyncIterator[tuple[MeshHandle, list[NodeInfo]]]:
    """`count` standalone in-process cache nodes (node0, node1, ...) and their NodeInfos."""
    async with local_mesh(metadata=0, cachenodes=count, names={"cachenode": "node{i}"},
                          cachenode_settings={"engine": "memory://?capacity=64MiB"}) as mesh:
        yield mesh, [NodeInfo(m.name, m.address, 64 * 1024**2) for m in mesh.of_role("cachenode")]


async def test_batches_spread_over_nodes_and_round_trip() -> None:
    async with nodes(3) as (_, infos):
        client = await CacheClient.from_nodes(infos, namespace="m", chunk_bytes=256 * 1024)
        async with client:
            items = [(os.urandom(16), os.urandom(size)) for size in [100] * 60 + [1_000_000] * 3]
            assert await client.put_many(items) == len(items)
            got = await client.get_many([k for k, _ in items] + [b"absent-key"])
            assert [hashlib.sha256(v or b"").digest() for v in got[:-1]] == [
                hashlib.sha256(v).digest() for _, v in items
            ]
            assert got[-1] is None
            spread = Counter(client.placement(k)[0] for k, _ in items)
            assert len(spread) == 3 and min(spread.values()) >= 8
            stats = await client.stats()
            assert sum(s[0].items for s in stats.values()) == len(items)
            keys = [k for k, _ in items[:5]]
            assert await client.exists_prefix([*keys, b"absent-key", keys[0]]) == 5
            assert await client.delete(keys[0]) and await client.get(keys[0]) is None


async def test_replica_reads_when_a_node_is_gone() -> None:
    async with nodes(3) as (mesh, infos):
        client = await CacheClient.from_nodes(infos, replicas=2, retry_deadline_s=0.3)
        async with client:
            items = [(os.urandom(16), os.urandom(2000)) for _ in range(90)]
            assert await client.put_many(items) == len(items)
            await mesh.stop("node0")  # node0 is gone, the client is not told
            got = await client.get_many([k for k, _ in items])
            assert got == [v for _, v in items]  # every key had a replica elsewhere
            assert await client.exists_prefix([k for k, _ in items]) == len(items)


async def test_dead_node_means_misses_not_exceptions() -> None:
    async with nodes(2) as (_, infos):
        client = await CacheClient.from_nodes(
            [*infos, NodeInfo("ghost", "127.0.0.1:1", 64 * 1024**2)], retry_deadline_s=0.2
        )
        async with client:
            items = [(os.urandom(16), b"v") for _ in range(60)]
            stored = await client.put_many(items)
            on_ghost = [k for k, _ in items if client.placement(k)[0] == "ghost"]
            assert on_ghost and stored == len(items) - len(on_ghost)
            got = await client.get_many([k for k, _ in items])
            assert [k for (k, _), v in zip(items, got, strict=True) if v is None] == on_ghost
            assert await client.put(on_ghost[0], b"x") is False
            assert await client.get(on_ghost[0]) is None
            assert await client.exists([on_ghost[0]]) == [False]


async def test_token_block_helpers_return_the_cached_prefix() -> None:
    async with nodes(2) as (_, infos):
        client = await CacheClient.from_nodes(infos, namespace="llm")
        async with client:
            tokens = list(range(16 * 5 + 3))  # 5 full blocks
            blocks = [os.urandom(1000) for _ in range(5)]
            assert await client.put_token_blocks(tokens, blocks[:3]) == 3
            assert await client.cached_prefix_blocks(tokens) == 3
            assert await client.get_token_blocks(tokens) == blocks[:3]
            other = [7, *tokens[1:]]  # a different first token changes every chained key
            assert await client.get_token_blocks(other) == []
            with pytest.raises(ValueError):
                await client.put_token_blocks(tokens, [b"x"] * 6)


async def test_keys_for_tokens_use_the_shared_block_hasher() -> None:
    client = CacheClient(namespace="tenant", hasher=None)
    tokens = list(range(40))
    keys = client.keys_for_tokens(tokens)
    assert len(keys) == 2 and all(len(k) == 16 for k in keys)
    assert keys == client.hasher.token_keys(tokens)
    await client.close()


@pytest.mark.parametrize("replicas", [0, -1])
def test_bad_replica_count(replicas: int) -> None:
    with pytest.raises(ValueError):
        CacheClient(replicas=replicas)
