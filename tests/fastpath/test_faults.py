"""Faults on the zero-copy path with real processes: a client SIGKILLed while it holds views
and an unsealed allocation, and a client that allocates and never seals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.services.cachenode.storage.shm_arena import SHM_DIR
from kvmesh.tools.processes import kvmesh_env
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

pytestmark = pytest.mark.integration

NS = "faults"
MiB = 1 << 20

HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from kvmesh.runtime.channels import open_channel
    from kvmesh.client.local import LocalDataPath
    from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

    async def main():
        stub = cachenode_pb2_grpc.KVCacheStub(open_channel(sys.argv[1]))
        path = await LocalDataPath.open(stub, client_id="holder")
        await path.put("faults", b"held", b"H" * (1 << 20))
        views = await path.acquire("faults", [b"held", b"held", b"other"])
        assert all(v is not None for v in views)
        await stub.Allocate(cachenode_pb2.AllocateRequest(
            session_id=path.session_id, namespace="faults", key=b"unsealed", size=2 << 20))
        print("HELD", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)


async def _used(stub: cachenode_pb2_grpc.KVCacheStub) -> int:
    return int((await stub.Stats(cachenode_pb2.StatsRequest())).engines[0].used_bytes)


async def _wait_used(stub: cachenode_pb2_grpc.KVCacheStub, expected: int, timeout: float = 20.0) -> int:
    """The node's used bytes once they reach `expected` (fails after `timeout`)."""
    async def reached() -> bool:
        used = await _used(stub)
        assert used == expected, f"used {used}"
        return True

    await eventually(reached, timeout=timeout, interval=0.05, what=f"{expected} used bytes")
    return expected


async def test_client_killed_while_holding_views_releases_everything(kvmesh) -> None:
    node = kvmesh(
        "cachenode", "--standalone", "--storage", "memory://?capacity=8MiB&arena=shm", "--allocation-timeout-ms",
        "600000",  # only the broken Attach stream may free the unsealed allocation here
    )
    channel = open_channel(node.address or "")
    stub = cachenode_pb2_grpc.KVCacheStub(channel)
    await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"other", value=os.urandom(MiB)))
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, node.address or "",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=kvmesh_env(),
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        assert line.strip() == b"HELD", line
        await stub.Delete(cachenode_pb2.DeleteRequest(namespace=NS, key=b"held"))
        await stub.Delete(cachenode_pb2.DeleteRequest(namespace=NS, key=b"other"))
        # Deleted but held by the client's views, plus its 2 MiB unsealed allocation.
        assert await _used(stub) == 4 * MiB
        # Meanwhile the node refuses what it cannot fit without freeing held memory.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"big", value=b"x" * (5 * MiB)))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        holder.send_signal(signal.SIGKILL)
        await asyncio.wait_for(holder.wait(), 10)
        assert await _wait_used(stub, 0) == 0  # the broken stream released every view and allocation
        # The space is reclaimable and nothing is corrupted: a full-size value round-trips.
        value = os.urandom(8 * MiB - 4096)
        await stub.Put(cachenode_pb2.PutRequest(namespace=NS, key=b"big", value=value))
        got = await stub.Get(cachenode_pb2.GetRequest(namespace=NS, key=b"big"))
        assert got.found and got.value == value
        assert node.running()
    finally:
        if holder.returncode is None:
            holder.kill()
            await holder.wait()
        await channel.close()


async def test_node_sigkilled_leaves_no_segment_after_the_next_start(kvmesh) -> None:
    node = kvmesh("cachenode", "--standalone", "--storage", "memory://?capacity=4MiB&arena=shm")
    segments = [p.name for p in SHM_DIR.glob(f"kvmesh-{node.pid}-*")]
    assert len(segments) == 1
    node.kill()
    assert (SHM_DIR / segments[0]).exists()
    again = kvmesh("cachenode", "--standalone", "--storage", "memory://?capacity=4MiB&arena=shm")
    assert not (SHM_DIR / segments[0]).exists()  # the stale segment of the dead node is gone
    again.terminate()
    assert not list(SHM_DIR.glob(f"kvmesh-{again.pid}-*"))  # a clean stop unlinks its own


async def test_node_sigkilled_mid_reads_turns_local_path_reads_into_misses(kvmesh) -> None:
    from kvmesh.client import CacheClient, NodeInfo

    node = kvmesh("cachenode", "--standalone", "--storage", "memory://?capacity=64MiB&arena=shm")
    client = await CacheClient.from_nodes(
        [NodeInfo("n", node.address or "", 64 * MiB)], namespace=NS, retry_deadline_s=0.3, local="auto"
    )
    try:
        items = [(os.urandom(16), os.urandom(256 * 1024)) for _ in range(40)]
        assert await client.put_many(items) == len(items)
        assert client._local._paths  # the reads below go through shared memory
        keys = [k for k, _ in items]
        killed = asyncio.Event()
        rounds_after_kill: list[list[bytes | None]] = []

        async def reads() -> None:
            while len(rounds_after_kill) < 3:
                got = await client.get_many(keys)  # never raises
                for (_, value), result in zip(items, got, strict=True):
                    assert result is None or result == value  # never a wrong or torn value
                if killed.is_set():
                    rounds_after_kill.append(got)

        task = asyncio.create_task(reads())
        await asyncio.sleep(0.2)  # not a wait for a condition: the kill must land while reads run
        node.kill()
        killed.set()
        await asyncio.wait_for(task, 30)
        assert all(v is None for v in rounds_after_kill[-1])  # the dead node's keys are misses
    finally:
        await client.close()


async def test_node_stops_promptly_with_attached_clients(kvmesh) -> None:
    import time

    from kvmesh.client.local import LocalDataPath

    node = kvmesh(
        "cachenode", "--standalone", "--storage", "memory://?capacity=4MiB&arena=shm", "--grace-seconds", "60"
    )
    channel = open_channel(node.address or "")
    try:
        path = await LocalDataPath.open(cachenode_pb2_grpc.KVCacheStub(channel))
        started = time.monotonic()
        assert await asyncio.to_thread(node.terminate, 90) == 0
        assert time.monotonic() - started < 30  # the Attach stream ended at drain, not after the 60 s grace
        assert not path.attached
        await path.close()
    finally:
        await channel.close()
