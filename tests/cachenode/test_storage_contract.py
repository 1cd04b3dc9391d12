"""One contract every storage passes, run against real servers (Redis, Redis TLS, a 3-node
Redis Cluster, vineyardd) and real files (LMDB), plus tier lists of them."""

from __future__ import annotations

import asyncio
import hashlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.tools.testing.polling import eventually
from tests.cachenode.conftest import REDIS_PASSWORD

KINDS = [
    "memory-lru", "memory-s3fifo", "disk", "redis", "rediss", "redis-cluster", "vineyard",
    "tiered-through", "tiered-back",
]
# Storages whose capacity the test sets (so it can fill them up).
BOUNDED = ["memory-lru", "memory-s3fifo", "disk", "vineyard", "tiered-back"]


def storage_uri(kind: str, request: pytest.FixtureRequest, tmp_path: Path, capacity: str = "64MiB") -> str:
    prefix = f"t{uuid.uuid4().hex[:8]}:"
    if kind == "memory-lru":
        return f"memory://?capacity={capacity}&policy=lru"
    if kind == "memory-s3fifo":
        return f"memory://?capacity={capacity}&policy=s3fifo"
    if kind == "disk":
        return f"disk://{tmp_path}/store?capacity={capacity}&sync=false"
    if kind == "redis":
        server = request.getfixturevalue("redis")
        return f"redis://{server.address}/0?prefix={prefix}"
    if kind == "rediss":
        port, ca = request.getfixturevalue("redis_tls")
        return f"rediss://:{REDIS_PASSWORD}@127.0.0.1:{port}/0?ca={ca}&prefix={prefix}"
    if kind == "redis-cluster":
        ports = request.getfixturevalue("redis_cluster_ports")
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports) + f"?prefix={prefix}"
    if kind == "vineyard":
        sock = request.getfixturevalue("vineyard_socket")
        return f"vineyard://{sock}?capacity={capacity}"
    if kind == "tiered-through":
        return f"memory://?capacity=4MiB,disk://{tmp_path}/l2?capacity={capacity}&sync=false"
    if kind == "tiered-back":
        return f"memory://?capacity=4MiB&write=back,disk://{tmp_path}/l2?capacity={capacity}&sync=false"
    raise AssertionError(kind)


@pytest.fixture(params=KINDS)
async def storage(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    built = await build_storage(storage_uri(request.param, request, tmp_path))
    try:
        yield built
    finally:
        await built.close()
        await built.close()  # idempotent


def digest(value: bytes | None) -> str:
    assert value is not None
    return hashlib.sha256(value).hexdigest()


async def test_round_trip_of_every_size(storage: Storage) -> None:
    values = {f"k{n}".encode(): os.urandom(n) for n in (0, 1, 100, 65536, 1024**2 + 7)}
    for key, value in values.items():
        await storage.put("ns", key, value)
    for key, value in values.items():
        got = await storage.get("ns", key)
        assert got is not None and digest(got) == digest(value), key
    assert await storage.get("ns", b"absent") is None
    stats = storage.stats()
    assert stats.name and stats.hits >= len(values) and stats.misses >= 1


async def test_overwrite_delete_and_namespaces(storage: Storage) -> None:
    await storage.put("a", b"key", b"first")
    await storage.put("a", b"key", b"second")
    await storage.put("b", b"key", b"other namespace")
    assert await storage.get("a", b"key") == b"second"
    assert await storage.get("b", b"key") == b"other namespace"
    assert await storage.delete("a", b"key") is True
    assert await storage.delete("a", b"key") is False
    assert await storage.get("a", b"key") is None
    assert await storage.get("b", b"key") == b"other namespace"


async def test_exists_and_batches_keep_order(storage: Storage) -> None:
    items = [(f"b{i}".encode(), os.urandom(1000 + i)) for i in range(20)]
    await storage.put_many("ns", items)
    keys = [b"b0", b"nope", b"b5", b"b19", b"also-nope"]
    assert await storage.exists("ns", keys) == [True, False, True, True, False]
    got = await storage.get_many("ns", keys)
    assert got[0] == items[0][1] and got[2] == items[5][1] and got[3] == items[19][1]
    assert got[1] is None and got[4] is None
    assert await storage.exists("ns", []) == []


async def test_ttl_expires(storage: Storage) -> None:
    await storage.put("ns", b"short", b"v", ttl_seconds=1)
    await storage.put("ns", b"long", b"v")
    assert await storage.get("ns", b"short") == b"v"

    async def expired() -> bool:
        return await storage.get("ns", b"short") is None

    # Polled, with the bound the fixed 2.2 s sleep had: gone within 2.2 s of a 1 s TTL.
    await eventually(expired, timeout=2.2, interval=0.05, what="the 1 s TTL to expire")
    assert await storage.exists("ns", [b"short", b"long"]) == [False, True]


async def test_concurrent_writers_and_readers_never_see_torn_values(storage: Storage) -> None:
    versions = [bytes([v]) * 300_000 for v in range(8)]

    async def writer(v: bytes) -> None:
        await storage.put("ns", b"hot", v)

    async def reader() -> None:
        for _ in range(5):
            got = await storage.get("ns", b"hot")
            assert got is None or got in versions
            await asyncio.sleep(0)

    await asyncio.gather(*[writer(v) for v in versions], *[reader() for _ in range(4)])
    assert await storage.get("ns", b"hot") in versions


@pytest.mark.parametrize("kind", BOUNDED)
async def test_eviction_keeps_within_capacity(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    storage = await build_storage(storage_uri(kind, request, tmp_path, capacity="8MiB"))
    try:
        value_size = 512 * 1024
        for i in range(40):  # 20 MiB into an 8 MiB storage
            await storage.put("ns", f"e{i}".encode(), bytes([i]) * value_size)
        if hasattr(storage, "flush"):
            await storage.flush()
        lowest = storage.tier_stats()[-1]
        assert lowest.used_bytes <= 8 * 1024**2
        assert lowest.evictions > 0
        newest = await storage.get("ns", b"e39")
        assert newest == bytes([39]) * value_size
        assert await storage.get("ns", b"e0") is None
        with pytest.raises(ResourceExhausted):
            await storage.put("ns", b"too-big", b"x" * (9 * 1024**2))
        assert await storage.get("ns", b"e39") is not None  # still serving after refusing
    finally:
        await storage.close()


# (namespace, key) pairs a careless encoding maps to one stored key: a separator that may occur in
# either part, plain concatenation, a namespace that is a prefix of another with the rest moved
# into the key. A namespace is a tenant boundary: every pair must stay its own value.
COLLIDING = [
    ("tenant-a\0x", b"k"), ("tenant-a", b"x\0k"),
    ("ab", b"c"), ("a", b"bc"), ("", b"abc"),
    ("a/b", b"c"), ("a", b"/b/c"), ("a:b", b"c"), ("a", b":b:c"),
    ("\x01", b"a"), ("", b"\x01\x00\x00a"),
    ("a" * 255, b"k"), ("a" * 254, b"ak"),
]


async def test_namespaces_never_collide(storage: Storage) -> None:
    for i, (namespace, key) in enumerate(COLLIDING):
        await storage.put(namespace, key, f"value {i}".encode())
    for i, (namespace, key) in enumerate(COLLIDING):
        assert await storage.get(namespace, key) == f"value {i}".encode(), (namespace, key)
    assert await storage.exists("a", [b"b/c", b"bc\0"]) == [False, False]
    # Deleting one pair leaves every other one in place.
    assert await storage.delete("a", b"bc") is True
    assert await storage.get("a", b"bc") is None
    assert await storage.get("ab", b"c") == f"value {COLLIDING.index(('ab', b'c'))}".encode()
    assert await storage.get("", b"abc") == f"value {COLLIDING.index(('', b'abc'))}".encode()
