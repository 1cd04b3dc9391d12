"""Per-namespace byte quotas and request rates on a real cache node process (gRPC and the bulk
data plane), and the quota ledger against a real storage (reconciled when values expire)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable

import grpc
import pytest

from kvmesh.client.dataplane import DataPlaneConnecting, DataPlanePool, DataPlaneRefused
from kvmesh.frames import Status
from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.quotas import NamespaceQuotas
from kvmesh.services.cachenode.rate_limits import NamespaceRateLimits
from kvmesh.services.cachenode.settings import CacheNodeSettings
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.status import status_of
from kvmesh.v1 import cachenode_pb2

KiB, MiB = 1024, 1024**2



@pytest.mark.integration
async def test_quotas_and_rates_on_a_node_process() -> None:
    settings = {
        "storage": "memory://?capacity=64MiB",
        "namespace_quota_bytes": "1MiB",
        "namespace_quotas": "big=4MiB,free=0",
        "namespace_rate_limits": "slow=3",
    }
    async with process_mesh(metadata=0, cachenodes=1, cachenode_settings=settings, timeout=100) as mesh:
        stub = mesh.kvcache()
        process = mesh.of_role("cachenode")[0].process
        assert process is not None

        def put(ns: str, key: bytes, size: int) -> Awaitable[cachenode_pb2.PutResponse]:
            return stub.Put(cachenode_pb2.PutRequest(namespace=ns, key=key, value=os.urandom(size)), timeout=10)

        async def found(ns: str, key: bytes) -> bool:
            return bool((await stub.Get(cachenode_pb2.GetRequest(namespace=ns, key=key), timeout=10)).found)

        # Quota: 1 MiB per namespace by default.
        assert await status_of(put("a", b"k1", 600 * KiB)) == grpc.StatusCode.OK
        assert await status_of(put("a", b"k2", 600 * KiB)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not await found("a", b"k2")  # nothing written
        assert await status_of(put("a", b"k1", 900 * KiB)) == grpc.StatusCode.OK  # replacing counts once
        assert await status_of(put("other", b"k2", 600 * KiB)) == grpc.StatusCode.OK  # another tenant's own quota
        assert (await stub.Delete(cachenode_pb2.DeleteRequest(namespace="a", key=b"k1"), timeout=10)).deleted
        assert await status_of(put("a", b"k2", 600 * KiB)) == grpc.StatusCode.OK  # deleting freed it
        # Overrides: a bigger quota, and none at all.
        assert await status_of(put("big", b"k", 3 * MiB)) == grpc.StatusCode.OK
        assert await status_of(put("free", b"k", 5 * MiB)) == grpc.StatusCode.OK
        # BatchPut: the value over quota fails alone (RESOURCE_EXHAUSTED), the others are stored.
        chunks = [cachenode_pb2.PutChunk(namespace="b", key=k, total_size=n, data=os.urandom(n))
                  for k, n in ((b"x", 700 * KiB), (b"y", 700 * KiB), (b"z", 100 * KiB))]
        reply = await stub.BatchPut(iter(chunks), timeout=10)
        assert reply.stored == 2 and [(e.key, e.code) for e in reply.errors] == [(b"y", "RESOURCE_EXHAUSTED")]
        assert not await found("b", b"y")
        # The data plane charges the same ledger: a frame over the quota is refused whole.
        pool = DataPlanePool(process.ready["data_endpoint"])
        try:
            for _ in range(40):
                try:
                    with pytest.raises(DataPlaneRefused) as info:
                        await pool.put("b", [b"p", b"q"], [memoryview(bytes(200 * KiB))] * 2)
                    break
                except DataPlaneConnecting:
                    await asyncio.sleep(0.25)
            assert info.value.status == Status.RESOURCE_EXHAUSTED and "quota" in info.value.message
            assert await pool.exists("b", [b"p", b"q"]) == [False, False]
            assert await pool.put("b", [b"p"], [memoryview(bytes(100 * KiB))]) == b"\x00"
        finally:
            await pool.close()
        # Rate: namespace "slow" may make 3 requests a second (a burst of 3), others are unlimited.
        codes = [await status_of(stub.Exists(cachenode_pb2.ExistsRequest(namespace="slow", keys=[b"k"]), timeout=10))
                 for _ in range(6)]
        assert codes[:3] == [grpc.StatusCode.OK] * 3 and grpc.StatusCode.RESOURCE_EXHAUSTED in codes[3:]
        refused = [c for c in codes if c != grpc.StatusCode.OK]
        assert all(c == grpc.StatusCode.RESOURCE_EXHAUSTED for c in refused)
        for _ in range(20):
            assert await status_of(stub.Exists(cachenode_pb2.ExistsRequest(namespace="a", keys=[b"k"]), timeout=10)) \
                == grpc.StatusCode.OK
        await asyncio.sleep(1.1)
        assert await status_of(stub.Exists(cachenode_pb2.ExistsRequest(namespace="slow", keys=[b"k"]), timeout=10)) \
            == grpc.StatusCode.OK  # refilled


async def test_the_ledger_forgets_values_the_storage_dropped() -> None:
    storage = await build_storage("memory://?capacity=16MiB")
    quotas = NamespaceQuotas(1000, storage=lambda: storage)
    try:
        quotas.charge("t", [(b"a", 600)])
        await storage.put("t", b"a", bytes(600), ttl_seconds=1)
        with pytest.raises(ResourceExhausted):
            await quotas.charge_or_reconcile("t", [(b"b", 600)])  # a is still there
        await asyncio.sleep(1.2)  # a expires inside the storage, which tells nobody
        await quotas.charge_or_reconcile("t", [(b"b", 600)])
        assert quotas.used("t") == 600
        quotas.refund("t", b"b")
        assert quotas.used("t") == 0
        quotas.charge("t", [(b"c", 1000)])  # exactly the quota
        with pytest.raises(ResourceExhausted):
            quotas.charge("t", [(b"d", 1)])
    finally:
        await quotas.close()
        await storage.close()


def test_rate_buckets() -> None:
    rates = NamespaceRateLimits(2.0, {"fast": 100.0, "open": 0.0})
    rates.admit("t", now=10.0)
    rates.admit("t", now=10.0)
    with pytest.raises(ResourceExhausted):
        rates.admit("t", now=10.0)
    rates.admit("t", now=10.5)  # half a second refills one request
    for _ in range(100):
        rates.admit("fast", now=10.0)
        rates.admit("open", now=10.0)


def test_quota_flags() -> None:
    settings = CacheNodeSettings(namespace_quota_bytes="2GiB", namespace_quotas="a=1MiB, b=0",
                                 namespace_rate_limit=50, namespace_rate_limits="a=5")
    assert settings.namespace_quota_bytes == 2 * 1024**3
    assert settings.quota_overrides == {"a": MiB, "b": 0}
    assert settings.rate_overrides == {"a": 5.0}
    for bad in ({"namespace_quotas": "a"}, {"namespace_quotas": "a=lots"}, {"namespace_rate_limits": "a=-1"},
                {"data_tls_cert": "x.pem"}):
        with pytest.raises(ValueError):
            CacheNodeSettings(**bad)  # type: ignore[arg-type]
