"""The client library takes the zero-copy path to co-located nodes and gRPC to the others."""

from __future__ import annotations

import os

from kvmesh.client import CacheClient, NodeInfo
from kvmesh.tools.testing.polling import eventually
from tests.fastpath.harness import zerocopy_node

NS = "client"


async def test_cache_client_uses_shared_memory_for_a_local_node_and_grpc_otherwise() -> None:
    async with zerocopy_node() as shm_node, zerocopy_node("memory://?capacity=16MiB&arena=heap") as heap_node:
        for node, expect_sessions in ((shm_node, 1), (heap_node, 0)):
            client = await CacheClient.from_nodes(
                [NodeInfo("n", node.address, 16 << 20)], namespace=NS, local="auto"
            )
            try:
                items = [(f"k{i}".encode(), os.urandom(300_000 + i)) for i in range(5)]
                assert await client.put_many(items) == 5
                assert await client.get_many([k for k, _ in items] + [b"nope"]) == [v for _, v in items] + [None]
                assert node.sessions() == expect_sessions
                assert await node.storage.get(NS, b"k3") == items[3][1]
            finally:
                await client.close()
            await eventually(lambda: node.sessions() == 0)  # noqa: B023 - awaited here: closing detaches

        never = await CacheClient.from_nodes([NodeInfo("n", shm_node.address, 16 << 20)], namespace=NS, local="never")
        try:
            assert await never.put(b"x", b"y")
            assert await never.get(b"x") == b"y"
            assert shm_node.sessions() == 0
        finally:
            await never.close()
