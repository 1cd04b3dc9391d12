"""The KVCache service over gRPC: unary calls, chunked batches, and bad input."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime
from kvmesh.services.cachenode.service import CacheNodeService
from kvmesh.services.cachenode.settings import CacheNodeSettings
from kvmesh.v1 import cachenode_pb2 as pb
from kvmesh.v1 import cachenode_pb2_grpc

NS = "t"


def chunks_of(namespace: str, key: bytes, value: bytes, step: int, ttl: int = 0) -> list[pb.PutChunk]:
    out = []
    for off in range(0, max(len(value), 1), step):
        out.append(
            pb.PutChunk(namespace=namespace, key=key, total_size=len(value), offset=off,
                        data=value[off : off + step], ttl_seconds=ttl)
        )
    return out


async def stream(messages: list[pb.PutChunk]):
    for m in messages:
        yield m


async def batch_get(stub, keys: list[bytes], namespace: str = NS, stop: bool = False) -> dict[int, bytes | None]:
    out: dict[int, bytearray | None] = {}
    async for chunk in stub.BatchGet(pb.BatchGetRequest(namespace=namespace, keys=keys, stop_at_first_miss=stop)):
        if not chunk.found:
            out[chunk.index] = None
            continue
        buf = out.setdefault(chunk.index, bytearray())
        assert buf is not None and len(buf) == chunk.offset
        buf += chunk.data
        assert len(buf) <= chunk.total_size
    return {i: (bytes(v) if v is not None else None) for i, v in out.items()}


@pytest.mark.parametrize("storage", ["memory://?capacity=64MiB", "memory://?capacity=64MiB&policy=s3fifo"])
async def test_unary_round_trip(node, storage: str) -> None:
    async with node(storage=storage) as (_, stub):
        await stub.Put(pb.PutRequest(namespace=NS, key=b"a", value=b"hello"))
        got = await stub.Get(pb.GetRequest(namespace=NS, key=b"a"))
        assert got.found and got.value == b"hello"
        assert not (await stub.Get(pb.GetRequest(namespace="other", key=b"a"))).found  # namespaces isolate
        ex = await stub.Exists(pb.ExistsRequest(namespace=NS, keys=[b"a", b"zz", b"a"]))
        assert list(ex.present) == [True, False, True] and ex.prefix_length == 1
        assert (await stub.Delete(pb.DeleteRequest(namespace=NS, key=b"a"))).deleted
        assert not (await stub.Delete(pb.DeleteRequest(namespace=NS, key=b"a"))).deleted
        stats = await stub.Stats(pb.StatsRequest())
        assert stats.engines[0].name.startswith("memory(") and stats.engines[0].tier == "L1"


async def test_batch_put_and_get_chunked(node) -> None:
    async with node(chunk_bytes="64KiB") as (_, stub):
        values = {f"k{i}".encode(): os.urandom(size) for i, size in enumerate([0, 1, 65536, 200_000, 1_000_003])}
        messages = [m for k, v in values.items() for m in chunks_of(NS, k, v, 70_000)]
        resp = await stub.BatchPut(stream(messages))
        assert resp.stored == len(values) and not resp.errors
        keys = [*values, b"missing"]
        got = await batch_get(stub, keys)
        for i, (k, v) in enumerate(values.items()):
            value = got[i]
            assert value is not None and hashlib.sha256(value).digest() == hashlib.sha256(v).digest(), k
        assert got[len(values)] is None
        stopped = await batch_get(stub, [b"k1", b"missing", b"k2"], stop=True)
        assert stopped == {0: values[b"k1"], 1: None}


async def test_bad_chunks_store_nothing(node) -> None:
    async with node() as (_, stub):
        value = os.urandom(300_000)
        good = chunks_of(NS, b"good", value, 100_000)
        out_of_order = chunks_of(NS, b"ooo", value, 100_000)
        out_of_order[1], out_of_order[2] = out_of_order[2], out_of_order[1]
        inconsistent = chunks_of(NS, b"inc", value, 100_000)
        inconsistent[1].total_size = 999_999
        truncated = chunks_of(NS, b"trunc", value, 100_000)[:2]  # next key starts before it is complete
        overrun = [pb.PutChunk(namespace=NS, key=b"over", total_size=10, data=b"x" * 11)]
        late_start = [pb.PutChunk(namespace=NS, key=b"late", total_size=10, offset=5, data=b"x" * 5)]
        empty_key = [pb.PutChunk(namespace=NS, key=b"", data=b"x")]
        unfinished = chunks_of(NS, b"unfinished", value, 100_000)[:1]  # the stream ends mid-value
        messages = [*out_of_order, *inconsistent, *truncated, *overrun, *late_start, *empty_key, *good, *unfinished]
        resp = await stub.BatchPut(stream(messages))
        assert resp.stored == 1
        failed = {e.key: e.code for e in resp.errors}
        assert failed == {
            b"ooo": "INVALID_ARGUMENT", b"inc": "INVALID_ARGUMENT", b"trunc": "INVALID_ARGUMENT",
            b"over": "INVALID_ARGUMENT", b"late": "INVALID_ARGUMENT", b"": "INVALID_ARGUMENT",
            b"unfinished": "INVALID_ARGUMENT",
        }
        ex = await stub.Exists(pb.ExistsRequest(namespace=NS, keys=[b"good", b"ooo", b"inc", b"trunc", b"unfinished"]))
        assert list(ex.present) == [True, False, False, False, False]
        stats = (await stub.Stats(pb.StatsRequest())).engines[0]
        assert stats.items == 1 and stats.used_bytes == len(value)  # no reservation leaked


async def test_bad_unary_input_gets_clear_status(node) -> None:
    async with node(max_value_bytes=1000, max_key_bytes=32, namespaces="a,b") as (_, stub):
        cases = [
            (pb.PutRequest(namespace="a", key=b"", value=b"x"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.PutRequest(namespace="a", key=b"k" * 33, value=b"x"), grpc.StatusCode.INVALID_ARGUMENT),
            (pb.PutRequest(namespace="a", key=b"k", value=b"x" * 1001), grpc.StatusCode.RESOURCE_EXHAUSTED),
            (pb.PutRequest(namespace="c", key=b"k", value=b"x"), grpc.StatusCode.PERMISSION_DENIED),
        ]
        for request, code in cases:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Put(request)
            assert info.value.code() == code, request
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Get(pb.GetRequest(namespace="c", key=b"k"))
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await batch_get(stub, [b"ok", b""], namespace="a")
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        resp = await stub.BatchPut(stream([
            pb.PutChunk(namespace="c", key=b"k", data=b"x"),
            pb.PutChunk(namespace="a", key=b"big", total_size=5000, data=b"x" * 500),
            pb.PutChunk(namespace="a", key=b"big", total_size=5000, offset=500, data=b"x" * 500),
            pb.PutChunk(namespace="a", key=b"fine", data=b"y"),
        ]))
        assert resp.stored == 1
        assert {e.key: e.code for e in resp.errors} == {b"k": "PERMISSION_DENIED", b"big": "RESOURCE_EXHAUSTED"}
        # Still serving, nothing stored by the failures.
        await stub.Put(pb.PutRequest(namespace="a", key=b"k", value=b"ok"))
        ex = await stub.Exists(pb.ExistsRequest(namespace="a", keys=[b"k", b"big", b"fine"]))
        assert list(ex.present) == [True, False, True]


async def test_capacity_full_of_pinned_values_is_resource_exhausted(node) -> None:
    async with node(storage="memory://?capacity=1MiB") as (service, stub):
        storage = service.storage
        await stub.Put(pb.PutRequest(namespace=NS, key=b"a", value=b"a" * 600_000))
        pinned = storage.pin(NS, b"a")
        assert pinned is not None
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Put(pb.PutRequest(namespace=NS, key=b"b", value=b"b" * 600_000))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Put(pb.PutRequest(namespace=NS, key=b"huge", value=b"h" * (2 * 1024**2)))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert bytes(pinned.view) == b"a" * 600_000
        pinned.release()
        await stub.Put(pb.PutRequest(namespace=NS, key=b"b", value=b"b" * 600_000))  # now "a" is evicted
        stats = (await stub.Stats(pb.StatsRequest())).engines[0]
        assert stats.evictions == 1 and stats.items == 1 and stats.used_bytes == 600_000


async def test_data_path_rpcs_unimplemented_without_zerocopy(node) -> None:
    async with node(storage="memory://?capacity=64MiB&arena=heap") as (_, stub):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Allocate(pb.AllocateRequest(session_id="x", namespace=NS, key=b"k", size=1))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Attach(pb.AttachRequest(client_id="c")):
                pass
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_undecodable_chunks_get_a_status_and_the_node_keeps_serving() -> None:
    settings = CacheNodeSettings.model_validate({"listen": "127.0.0.1:0", "standalone": True})
    runtime = ServerRuntime(CacheNodeService(settings), settings)
    address = await runtime.start()
    channel = open_channel(address)
    try:
        raw_put = channel.stream_unary(
            "/kvmesh.v1.KVCache/BatchPut", request_serializer=lambda b: b,
            response_deserializer=pb.BatchPutResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:  # a varint that never ends
            await raw_put(iter([b"\x2a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "malformed" in (info.value.details() or "")
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        await stub.Put(pb.PutRequest(namespace=NS, key=b"after", value=b"ok"))
        assert (await stub.Get(pb.GetRequest(namespace=NS, key=b"after"))).value == b"ok"
    finally:
        await channel.close()
        await runtime.stop()
