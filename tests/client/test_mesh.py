"""A real mesh (metadata + cache nodes as `kvmesh` processes) driven by the client library."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from contextlib import AbstractAsyncContextManager

import grpc
import pytest

from kvmesh.client import CacheClient
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import common_pb2

pytestmark = pytest.mark.integration


NODE = {"engine": "memory://?capacity=128MiB"}


def start_mesh(nodes: int = 3, ttl: int = 2) -> AbstractAsyncContextManager[MeshHandle]:
    """Metadata on a pinned port (it restarts there) and cache nodes node0.., as `kvmesh` processes."""
    return process_mesh(
        metadata_backend="memory://", metadata_listen=f"127.0.0.1:{free_port()}", cachenodes=nodes,
        cachenode_settings={**NODE, "ttl_seconds": ttl}, names={"cachenode": "node{i}"}, timeout=110,
    )


async def list_cachenodes(mesh: MeshHandle) -> list[common_pb2.Member]:
    return await mesh.listed("cachenode")


async def test_placement_spread_and_replica_reads_after_a_node_leaves() -> None:
    # A long lease: leaving fast proves deregistration.
    async with start_mesh(ttl=60) as mesh, await CacheClient.connect(
        mesh.metadata_address, replicas=2, retry_deadline_s=0.3
    ) as client:
        await eventually(lambda: len(client.nodes) == 3, timeout=15, interval=0.05)
        items = [(os.urandom(16), os.urandom(16384)) for _ in range(300)]
        assert await client.put_many(items) == len(items)
        stats = await client.stats()
        held = {node: engines[0].items for node, engines in stats.items()}
        assert set(held) == {"node0", "node1", "node2"}
        assert all(n > 100 for n in held.values()) and sum(held.values()) == 2 * len(items)  # 2 replicas
        assert await client.get_many([k for k, _ in items]) == [v for _, v in items]
        members = await list_cachenodes(mesh)
        assert {m.id: m.capacity_bytes for m in members} == {f"node{i}": 128 * 1024**2 for i in range(3)}
        # Used bytes reach the metadata service early (a 60 s lease heartbeats every ~20 s).
        async def loads_reported() -> bool:
            loads = [m.load for m in await list_cachenodes(mesh)]
            assert all(load.used_bytes >= 100 * 16384 for load in loads), loads
            return True

        await eventually(loads_reported, timeout=15, interval=0.2, what="used bytes at the metadata service")

        await mesh.stop("node0")  # graceful: it deregisters, the client sees LEAVE at once
        await eventually(lambda: "node0" not in client.nodes, timeout=5, interval=0.05)
        assert await client.get_many([k for k, _ in items]) == [v for _, v in items]


async def test_sigkill_in_the_middle_of_a_batch_gives_misses_only() -> None:
    async with start_mesh() as mesh, await CacheClient.connect(mesh.metadata_address, retry_deadline_s=0.3) as client:
        await eventually(lambda: len(client.nodes) == 3, timeout=15, interval=0.05)
        items = [(os.urandom(16), os.urandom(256 * 1024)) for _ in range(120)]  # 30 MiB
        assert await client.put_many(items) == len(items)
        keys = [k for k, _ in items]
        victim_keys = {k for k in keys if client.placement(k)[0] == "node1"}
        assert victim_keys

        killed = asyncio.Event()

        async def reads() -> list[list[bytes | None]]:
            rounds: list[list[bytes | None]] = []
            after_kill = 0
            while after_kill < 2:  # keep reading until two whole batches ran after the kill
                if killed.is_set():
                    after_kill += 1
                rounds.append(await client.get_many(keys))
            return rounds

        async def writes() -> list[int]:
            stored = []
            after_kill = 0
            while after_kill < 2:
                if killed.is_set():
                    after_kill += 1
                batch = [(os.urandom(16), os.urandom(256 * 1024)) for _ in range(30)]
                stored.append(await client.put_many(batch))
            return stored

        task = asyncio.create_task(reads())
        writer = asyncio.create_task(writes())
        await asyncio.sleep(0.3)  # not a wait for a condition: the kill must land while batches run
        mesh.member("node1").process.kill()  # type: ignore[union-attr]  # SIGKILL, no deregistration, while batches are in flight
        killed.set()
        rounds = await asyncio.wait_for(task, 60)  # no exception reaches the caller
        stored_counts = await asyncio.wait_for(writer, 60)  # puts: a count, never an exception
        assert stored_counts[0] == 30 and min(stored_counts) < 30  # keys placed on the dead node failed
        for got in rounds:
            for (key, value), result in zip(items, got, strict=True):
                assert result is None or result == value  # never a wrong or torn value
                if result is None:
                    assert key in victim_keys  # only the dead node's keys miss
        assert {k for k, v in zip(keys, rounds[-1], strict=True) if v is None} == victim_keys
        after = await client.get_many(keys)
        assert {k for k, v in zip(keys, after, strict=True) if v is None} <= victim_keys
        stored = await client.put_many([(os.urandom(16), b"x") for _ in range(30)])
        assert stored >= 10  # keys placed on the dead node fail until its lease expires


async def test_a_joining_node_takes_about_its_share() -> None:
    async with start_mesh() as mesh, await CacheClient.connect(mesh.metadata_address) as client:
        await eventually(lambda: len(client.nodes) == 3, timeout=15, interval=0.05)
        keys = [os.urandom(16) for _ in range(4000)]
        before = {k: client.placement(k)[0] for k in keys}
        await mesh.add("cachenode", engine=NODE["engine"], ttl_seconds=2)  # node3
        await eventually(lambda: len(client.nodes) == 4, timeout=15, interval=0.05)
        after = {k: client.placement(k)[0] for k in keys}
        moved = [k for k in keys if before[k] != after[k]]
        assert all(after[k] == "node3" for k in moved)
        assert 0.12 < len(moved) / len(keys) < 0.38  # about 1/4
        new_items = [(k, b"v") for k in keys[:200]]
        assert await client.put_many(new_items) == 200
        stats = await client.stats()
        assert stats["node3"][0].items > 20
        assert Counter(after.values())["node3"] == len(moved)


async def test_nodes_register_again_after_the_metadata_service_restarts() -> None:
    async with start_mesh() as mesh, await CacheClient.connect(mesh.metadata_address) as client:
        await eventually(lambda: len(client.nodes) == 3, timeout=15, interval=0.05)
        await mesh.kill("metadata")  # memory:// backend: every lease is gone with it
        await mesh.restart("metadata")  # on the same port
        # The nodes re-register by themselves; the client's watch reconnects and resyncs.
        async def registered_again() -> bool:
            return len(await list_cachenodes(mesh)) == 3

        # A channel that saw the old process die may need a reconnect first: UNAVAILABLE is "not yet".
        await eventually(registered_again, timeout=30, interval=0.1, what="cache nodes to register again",
                         retry_on=(AssertionError, grpc.aio.AioRpcError))
        watcher = client._watcher
        assert watcher is not None
        await eventually(lambda: watcher.reconnects >= 1 and len(client.nodes) == 3, timeout=30, interval=0.05)
        items = [(os.urandom(16), b"after restart") for _ in range(30)]
        assert await client.put_many(items) == 30
        assert await client.get_many([k for k, _ in items]) == [v for _, v in items]


def test_a_bad_engine_uri_stops_the_node_with_a_clear_message(kvmesh) -> None:
    node = kvmesh("cachenode", "--standalone", "--engine", "nosuch://x", ready=False, name="bad-engine")
    assert node.wait_exit(20) == 1
    assert "unknown storage scheme 'nosuch'" in node.output
    node = kvmesh("cachenode", "--standalone", "--engine", "memory://?capacity=lots", ready=False, name="bad-size")
    assert node.wait_exit(20) == 1
    assert "capacity" in node.output
