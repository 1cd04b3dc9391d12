"""A cache node with a disk storage, as a real process: restart and SIGKILL lose no acknowledged value."""

from __future__ import annotations

import asyncio
import hashlib
import os
from pathlib import Path

import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2 as pb
from kvmesh.v1 import cachenode_pb2_grpc

pytestmark = pytest.mark.integration


def start(kvmesh, store: Path, name: str):
    return kvmesh(
        "cachenode", "--standalone", "--listen", "127.0.0.1:0",
        "--storage", f"disk://{store}?capacity=512MiB&sync=false", "--chunk-bytes", "256KiB", name=name,
    )


def make_value(key: bytes, size: int) -> bytes:
    """A value whose checksum is recorded inside it, so a torn value can be recognised."""
    body = os.urandom(size)
    return hashlib.sha256(key + body).digest() + body


def intact(key: bytes, value: bytes) -> bool:
    return hashlib.sha256(key + value[32:]).digest() == value[:32]


async def read_all(address: str, keys: list[bytes]) -> list[bytes | None]:
    async with open_channel(address) as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        out: list[bytes | None] = [None] * len(keys)
        parts: dict[int, bytearray] = {}
        async for chunk in stub.BatchGet(pb.BatchGetRequest(namespace="p", keys=keys)):
            if chunk.found:
                parts.setdefault(chunk.index, bytearray()).extend(chunk.data)
                if len(parts[chunk.index]) == chunk.total_size:
                    out[chunk.index] = bytes(parts.pop(chunk.index))
        return out


async def test_values_survive_restart_and_sigkill_mid_writes(kvmesh, tmp_path: Path) -> None:
    store = tmp_path / "store"
    node = start(kvmesh, store, "disk-1")
    assert node.address is not None
    acknowledged: dict[bytes, bytes] = {}
    async with open_channel(node.address) as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        for i in range(20):
            key = f"first-{i}".encode()
            value = make_value(key, 100_000)
            await stub.Put(pb.PutRequest(namespace="p", key=key, value=value))
            acknowledged[key] = value
    node.terminate()  # graceful restart
    node = start(kvmesh, store, "disk-2")
    assert node.address is not None
    got = await read_all(node.address, list(acknowledged))
    assert got == list(acknowledged.values())

    # Many writers, each appending keys it has seen acknowledged; SIGKILL at a random moment.
    async with open_channel(node.address) as channel:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)

        async def writer(w: int) -> None:
            for i in range(10_000):
                key = f"w{w}-{i}".encode()
                value = make_value(key, 300_000 + (i % 7) * 1000)
                chunks = [
                    pb.PutChunk(namespace="p", key=key, total_size=len(value), offset=o, data=value[o : o + 65536])
                    for o in range(0, len(value), 65536)
                ]

                async def send(chunks: list[pb.PutChunk] = chunks):
                    for c in chunks:
                        yield c

                resp = await stub.BatchPut(send())
                if resp.stored == 1:
                    acknowledged[key] = value

        tasks = [asyncio.create_task(writer(w)) for w in range(4)]
        # Kill once the writers are well under way (16 acknowledged since they started), mid-write.
        await eventually(lambda: len(acknowledged) >= 20 + 16, timeout=30, what="the writers to get going")
        node.kill()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, Exception) for r in results)  # the writers saw the node die
    written_before_kill = len(acknowledged) - 20
    assert written_before_kill > 4

    node = start(kvmesh, store, "disk-3")
    assert node.address is not None
    keys = list(acknowledged)
    got = await read_all(node.address, keys)
    for key, stored in zip(keys, got, strict=True):
        assert stored is not None, f"acknowledged {key!r} lost"
        assert intact(key, stored) and stored == acknowledged[key]
    # Unacknowledged writes may or may not be there, but never torn.
    probe = [f"w{w}-{i}".encode() for w in range(4) for i in range(200)]
    for key, maybe in zip(probe, await read_all(node.address, probe), strict=True):
        assert maybe is None or intact(key, maybe)
