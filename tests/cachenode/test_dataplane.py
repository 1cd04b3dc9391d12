"""The bulk data plane against a real `kvmesh cachenode` process: frames, pipelining, bounds, faults, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch

from kvmesh import frames
from kvmesh.client import CacheClient
from kvmesh.client.cache import NodeInfo
from kvmesh.client.dataplane import (
    MISS,
    TOO_SMALL,
    DataPlanePool,
    DataPlaneRefused,
    DataPlaneUnavailable,
    client_ssl_context,
)
from kvmesh.frames import Flag, Op, Status
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.testing.certs import TlsFiles, make_tls_files
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2

pytestmark = pytest.mark.integration

MiB = 1024**2


@contextlib.asynccontextmanager
async def node(**settings: Any) -> AsyncIterator[tuple[MeshHandle, str]]:
    """One standalone node process; yields the mesh and its data endpoint."""
    settings.setdefault("storage", "memory://?capacity=256MiB")
    async with process_mesh(metadata=0, cachenodes=1, cachenode_settings=settings, timeout=100) as mesh:
        process = mesh.of_role("cachenode")[0].process
        assert process is not None
        yield mesh, process.ready.get("data_endpoint", "")


class Raw:
    """A hand-driven connection, for frames no well-behaved client would send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, endpoint: str) -> Raw:
        host, _, port = endpoint.rpartition(":")
        return cls(*await asyncio.open_connection(host, int(port)))

    async def send(self, *parts: bytes) -> None:
        for part in parts:
            self.writer.write(part)
        await self.writer.drain()

    async def frame(self, timeout: float = 10.0) -> tuple[frames.Header, bytes, bytes]:
        """The next frame: header, metadata, payload."""
        async with asyncio.timeout(timeout):
            header = frames.decode_header(await self.reader.readexactly(frames.HEADER_BYTES))
            meta = await self.reader.readexactly(header.meta_len)
            payload = await self.reader.readexactly(header.payload_len)
        return header, meta, payload

    async def closed_by_node(self, timeout: float = 10.0) -> bool:
        """True once the node closed the connection (everything it still sends is read away)."""
        async with asyncio.timeout(timeout):
            try:
                while await self.reader.read(1 << 20):
                    pass
            except ConnectionError:
                pass
        return True

    def close(self) -> None:
        self.writer.transport.abort()


def put_frame(request_id: int, items: list[tuple[bytes, bytes]], namespace: str = "ns") -> bytes:
    keys = [k for k, _ in items]
    return frames.encode_request(Op.PUT, request_id, namespace, keys, [len(v) for _, v in items]) + b"".join(
        v for _, v in items
    )


async def stored(mesh: MeshHandle, key: bytes, namespace: str = "ns") -> bytes | None:
    """The value as the gRPC plane sees it."""
    response = await mesh.kvcache().Get(cachenode_pb2.GetRequest(namespace=namespace, key=key))
    return response.value if response.found else None


async def used_bytes(mesh: MeshHandle) -> int:
    stats = await mesh.kvcache().Stats(cachenode_pb2.StatsRequest())
    return int(stats.engines[0].used_bytes)


async def test_batches_pipelining_and_both_planes_agree() -> None:
    async with node() as (mesh, endpoint):
        pool = DataPlanePool(endpoint, connections=1)
        try:
            items = [(f"k{i}".encode(), os.urandom(size)) for i, size in enumerate([0, 1, 4096, 3 * MiB, 65536])]
            codes = await pool.put("ns", [k for k, _ in items], [memoryview(v) for _, v in items])
            assert codes == bytes(len(items))
            for key, value in items:
                assert await stored(mesh, key) == value
            # 40 requests in flight on one connection, each answered with its own values.
            keys = [k for k, _ in items]
            answers = await asyncio.gather(*(pool.get("ns", [*keys[i % 5 :], b"absent"]) for i in range(40)))
            for i, got in enumerate(answers):
                assert got == [*[v for _, v in items][i % 5 :], None]
            assert await pool.get("ns", [b"k0", b"absent", b"k2"], stop_at_first_miss=True) == [b"", None, None]
            assert await pool.exists("ns", [b"k2", b"absent"]) == [True, False]
            assert await pool.delete("ns", [b"k2", b"absent"]) == [True, False]
            assert await stored(mesh, b"k2") is None
            # Values the gRPC plane stored are read by the data plane, and the other way round.
            await mesh.kvcache().Put(cachenode_pb2.PutRequest(namespace="ns", key=b"g", value=b"from grpc"))
            assert await pool.get("ns", [b"g"]) == [bytearray(b"from grpc")]
            with pytest.raises(DataPlaneRefused) as refused:
                await pool.get("ns", [b""])
            assert refused.value.status == Status.INVALID_ARGUMENT
        finally:
            await pool.close()


async def test_storage_without_an_arena(tmp_path: Path) -> None:
    """disk:// buffers each value and stores a frame's values with one batch; reads are copies."""
    async with node(storage=f"disk://{tmp_path}?capacity=64MiB&sync=false", max_value_bytes=4 * MiB) as (
        mesh,
        endpoint,
    ):
        pool = DataPlanePool(endpoint)
        try:
            items = [(f"d{i}".encode(), os.urandom(size)) for i, size in enumerate([0, 10, 2 * MiB, 65536])]
            codes = await pool.put("ns", [k for k, _ in items], [memoryview(v) for _, v in items])
            assert codes == bytes(len(items))
            assert await pool.get("ns", [k for k, _ in items]) == [bytearray(v) for _, v in items]
            assert await stored(mesh, b"d2") == items[2][1]
            assert await pool.get("ns", [b"d1", b"nope", b"d2"], stop_at_first_miss=True) == [
                bytearray(items[1][1]),
                None,
                None,
            ]
            out = bytearray(65536)
            assert await pool.get_into("ns", [b"d3"], [memoryview(out)]) == [65536] and out == items[3][1]
            assert await pool.exists("ns", [b"d0", b"nope"]) == [True, False]
            # Pipelined puts and gets, several waiting on the storage at once.
            keys = [f"p{i}".encode() for i in range(12)]
            await asyncio.gather(*(pool.put("ns", [k], [memoryview(k * 1000)]) for k in keys))
            got = await asyncio.gather(*(pool.get("ns", [k]) for k in keys))
            assert got == [[bytearray(k * 1000)] for k in keys]
        finally:
            await pool.close()


async def test_get_into_and_put_from_caller_buffers() -> None:
    async with node() as (mesh, endpoint):
        address = mesh.of_role("cachenode")[0].address
        infos = [NodeInfo("n0", address, data_endpoint=endpoint)]
        array = np.arange(64 * 1024, dtype=np.float32).reshape(256, 256)
        tensor = torch.arange(100_000, dtype=torch.float32).to(torch.bfloat16)
        for mode in ("auto", "never"):  # the data plane, then gRPC (copied in)
            async with await CacheClient.from_nodes(infos, local="never", data_plane=mode) as client:
                assert (client._nodes["n0"].data is not None) == (mode == "auto")
                assert await client.batch_put_from([b"arr", b"ten"], [array, tensor]) == [True, True]
                out_array = np.zeros_like(array)
                out_tensor = torch.zeros_like(tensor)
                small = bytearray(16)
                sizes = await client.batch_get_into(
                    [b"arr", b"ten", b"arr", b"nope"], [out_array, out_tensor, small, bytearray(4)]
                )
                assert sizes == [array.nbytes, tensor.numel() * 2, TOO_SMALL, MISS]
                assert np.array_equal(out_array, array) and torch.equal(out_tensor, tensor)
                assert small == bytearray(16)  # left alone
                view = memoryview(bytearray(array.nbytes + 10))
                assert await client.get_into(b"arr", view) == array.nbytes
                assert bytes(view[: array.nbytes]) == array.tobytes()
                assert await client.get(b"ten") == tensor.view(torch.uint8).numpy().tobytes()
                assert await client.delete(b"arr")
        with pytest.raises(TypeError, match="read-only"):
            async with await CacheClient.from_nodes(infos, local="never") as client:
                await client.get_into(b"ten", b"immutable")


async def test_unreachable_data_plane_falls_back_to_grpc() -> None:
    async with node(data_listen="off") as (mesh, _):
        process = mesh.of_role("cachenode")[0].process
        assert process is not None and "data_endpoint" not in process.ready
        address = mesh.of_role("cachenode")[0].address
        dead = f"127.0.0.1:{await _closed_port()}"
        async with await CacheClient.from_nodes([NodeInfo("n0", address, data_endpoint=dead)], local="never") as client:
            assert await client.put(b"k", b"v" * 1000)
            assert await client.get_many([b"k", b"x"]) == [b"v" * 1000, None]
            out = bytearray(1000)
            assert await client.get_into(b"k", out) == 1000 and out == b"v" * 1000


async def _closed_port() -> int:
    from kvmesh.tools.testing.ports import free_port

    return free_port()


async def test_bad_frames_get_a_clear_error_and_the_node_serves_others() -> None:
    async with node(max_value_bytes=MiB, data_max_batch_keys=64, data_max_frame_bytes=8 * MiB) as (mesh, endpoint):
        good = DataPlanePool(endpoint)
        try:
            # Unknown op: answered UNIMPLEMENTED, its bytes skipped, the connection goes on.
            raw = await Raw.open(endpoint)
            await raw.send(frames.encode_header(99, 7, 0, 3, 2) + b"abcde")
            header, meta, _ = await raw.frame()
            assert (header.status, header.request_id) == (Status.UNIMPLEMENTED, 7) and b"unknown op" in meta
            await raw.send(put_frame(8, [(b"after", b"x")]))
            header, meta, _ = await raw.frame()
            assert (header.status, header.request_id, meta) == (Status.OK, 8, b"\x00")
            # A value over --max-value-bytes: RESOURCE_EXHAUSTED, the payload read and dropped.
            await raw.send(put_frame(9, [(b"big", bytes(MiB + 1))]))
            header, meta, _ = await raw.frame()
            assert header.status == Status.RESOURCE_EXHAUSTED and b"max-value-bytes" in meta
            await raw.send(frames.encode_request(Op.GET, 10, "ns", [b"after", b"big"]))
            header, meta, payload = await raw.frame()
            assert frames.decode_lengths(header.entries, meta) == (1, frames.MISSING) and payload == b"x"
            raw.close()

            put_meta = frames.encode_request(Op.PUT, 1, "ns", [b"a"], [10])[frames.HEADER_BYTES :]
            broken = [
                b"XX" + bytes(30),  # bad magic
                frames.encode_header(Op.GET, 1, 10_000, 20, 0),  # bogus count
                frames.encode_header(Op.GET, 1, 1, 1 << 30, 0),  # metadata far over its bound
                frames.encode_header(Op.GET, 1, 1, 8, 5),  # a GET announcing values
                frames.encode_header(Op.PUT, 1, 1, 17, 1 << 40),  # a frame of 1 TiB
                frames.encode_header(Op.PUT, 1, 1, 19, 5) + put_meta + bytes(5),  # sizes (10) != payload (5)
                frames.encode_header(Op.GET, 1, 2, 9, 0) + b"\x00\x00\x00\x00\x00\x00\x01\x00z",  # truncated key
                frames.encode_header(Op.PUT, 1, 1, 16, 5, flags=Flag.RESPONSE) + bytes(16),  # a response
            ]
            for number, frame in enumerate(broken):
                raw = await Raw.open(endpoint)
                await raw.send(frame)
                try:
                    header, meta, _ = await raw.frame()
                except TimeoutError:
                    raise AssertionError(f"no answer to broken frame {number}") from None
                assert header.status in (Status.INVALID_ARGUMENT, Status.RESOURCE_EXHAUSTED), (frame, meta)
                assert await raw.closed_by_node()
                raw.close()
            assert await good.get("ns", [b"after"]) == [bytearray(b"x")]
            assert await stored(mesh, b"a") is None
        finally:
            await good.close()


async def test_killed_mid_value_publishes_nothing() -> None:
    async with node() as (mesh, endpoint):
        raw = await Raw.open(endpoint)
        whole, cut = os.urandom(MiB), os.urandom(4 * MiB)
        frame = put_frame(1, [(b"whole", whole), (b"cut", cut)])
        await raw.send(frame[: len(frame) - 2 * MiB])  # the second value half sent
        await eventually(lambda: stored(mesh, b"whole"), timeout=10, what="the first value to be published")
        assert await used_bytes(mesh) >= 5 * MiB  # the second one's space is reserved, unpublished
        assert await stored(mesh, b"cut") is None
        raw.close()  # killed mid-value

        async def released() -> bool:
            return await used_bytes(mesh) == MiB

        await eventually(released, timeout=10, what="the half-received value's space to be freed")
        assert await stored(mesh, b"cut") is None and await stored(mesh, b"whole") == whole


async def test_slow_sender_and_non_reading_client_are_cut() -> None:
    settings = {"data_stall_timeout_s": 1.0, "data_min_rate_bytes": 64 * 1024, "data_max_frame_bytes": 16 * MiB}
    async with node(**settings) as (mesh, endpoint):
        good = DataPlanePool(endpoint)
        try:
            # One byte at a time: cut within a few stall windows, with an error frame.
            slow = await Raw.open(endpoint)
            frame = put_frame(1, [(b"slow", os.urandom(4096))])

            async def trickle() -> None:
                with contextlib.suppress(ConnectionError):
                    for i in range(len(frame)):
                        await slow.send(frame[i : i + 1])
                        await asyncio.sleep(0.2)

            trickler = asyncio.create_task(trickle())
            try:
                header, meta, _ = await slow.frame(timeout=15)
                assert header.status == Status.DEADLINE_EXCEEDED, meta
                assert await slow.closed_by_node()
            finally:
                trickler.cancel()
                slow.close()
            assert await stored(mesh, b"slow") is None

            # A client that asks for 8 MiB values again and again and never reads.
            value = os.urandom(8 * MiB)
            assert await good.put("ns", [b"big"], [memoryview(value)]) == b"\x00"
            deaf = await Raw.open(endpoint)
            cast(asyncio.Transport, deaf.writer.transport).pause_reading()
            request = frames.encode_request(Op.GET, 1, "ns", [b"big"])
            for _ in range(200):  # 1.6 GB of answers asked for
                deaf.writer.write(request)
            # Meanwhile everyone else is served.
            for _ in range(5):
                assert await good.get("ns", [b"big"]) == [bytearray(value)]
            cast(asyncio.Transport, deaf.writer.transport).resume_reading()
            await asyncio.sleep(4)  # the node gave up on it by now (it did not read for > 1 s)
            got = 0
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(10):
                    while chunk := await deaf.reader.read(1 << 20):
                        got += len(chunk)
            assert got < 64 * MiB, got  # far fewer than the 1.6 GB asked for: it was cut, not buffered
            deaf.close()
            # The pins it held are gone: the value can be deleted and its space is free.
            assert await good.delete("ns", [b"big"]) == [True]
            assert await used_bytes(mesh) == 0
        finally:
            await good.close()


async def test_inflight_budget_is_shared_by_connections() -> None:
    async with node(data_max_inflight_bytes=MiB) as (mesh, endpoint):
        first, second = await Raw.open(endpoint), await Raw.open(endpoint)
        value = os.urandom(768 * 1024)
        frame = put_frame(1, [(b"first", value)])
        await first.send(frame[:-1000])  # holds 768 KiB of the 1 MiB budget
        await asyncio.sleep(0.3)
        await second.send(put_frame(2, [(b"second", os.urandom(512 * 1024))]))
        header, meta, _ = await second.frame()
        assert header.status == Status.RESOURCE_EXHAUSTED and b"data-max-inflight-bytes" in meta
        await first.send(frame[-1000:])
        header, meta, _ = await first.frame()
        assert header.status == Status.OK and meta == b"\x00"
        await second.send(put_frame(3, [(b"second", b"now it fits")]))
        header, meta, _ = await second.frame()
        assert header.status == Status.OK and meta == b"\x00"
        assert await stored(mesh, b"first") == value
        first.close()
        second.close()


def _tls_flags(tls: TlsFiles, require_client_cert: bool) -> dict[str, Any]:
    """The service's own --tls-* flags: the data plane serves with the same files as gRPC."""
    return {"tls_cert": str(tls.cert), "tls_key": str(tls.key), "tls_ca": str(tls.ca),
            "tls_require_client_cert": require_client_cert}


async def test_tls_data_plane(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    async with node(**_tls_flags(tls, require_client_cert=False)) as (mesh, endpoint):
        address = mesh.of_role("cachenode")[0].address
        value = os.urandom(3 * MiB)
        context = client_ssl_context(str(tls.ca))
        pool = DataPlanePool(endpoint, ssl_context=context)
        try:
            assert await pool.put("ns", [b"secret"], [memoryview(value)]) == b"\x00"
            out = bytearray(len(value))
            assert await pool.get_into("ns", [b"secret", b"none"], [memoryview(out), memoryview(bytearray(1))]) == [
                len(value),
                MISS,
            ]
            assert out == value
        finally:
            await pool.close()
        # A client that does not trust the CA cannot connect; the client library uses gRPC then.
        with pytest.raises(ssl.SSLError):
            host, _, port = endpoint.rpartition(":")
            _, writer = await asyncio.open_connection(host, int(port), ssl=ssl.create_default_context())
            writer.close()
        infos = [NodeInfo("n0", address, data_endpoint=endpoint)]
        grpc_tls = ClientTLS(TLSFiles(tls_ca=tls.ca))
        async with await CacheClient.from_nodes(
            infos, namespace="ns", local="never", data_ssl=ssl.create_default_context(), tls=grpc_tls
        ) as c:
            assert await c.get(b"secret") == value
        # By default the client library's data plane uses the same CA as its gRPC channels.
        async with await CacheClient.from_nodes(infos, namespace="ns", local="never", tls=grpc_tls) as c:
            assert await c.get(b"secret") == value
            data = c._nodes["n0"].data
            assert data is not None
            await eventually(lambda: data.connected, timeout=10, what="the TLS data-plane connection")
            assert c._nodes["n0"].data_down_until == 0
            assert await c.get(b"secret") == value


async def test_mutual_tls(tmp_path: Path) -> None:
    tls = make_tls_files(tmp_path)
    async with node(**_tls_flags(tls, require_client_cert=True)) as (mesh, endpoint):
        address = mesh.of_role("cachenode")[0].address
        with_cert = client_ssl_context(str(tls.ca), str(tls.client_cert), str(tls.client_key))
        pool = DataPlanePool(endpoint, ssl_context=with_cert)
        try:
            assert await pool.put("ns", [b"m"], [memoryview(b"mutual")]) == b"\x00"
        finally:
            await pool.close()
        anonymous = DataPlanePool(endpoint, ssl_context=client_ssl_context(str(tls.ca)))
        try:
            with pytest.raises(DataPlaneUnavailable):  # the node refuses a client without a certificate
                await anonymous.get("ns", [b"m"])
        finally:
            await anonymous.close()
        infos = [NodeInfo("n0", address, data_endpoint=endpoint)]
        mutual = ClientTLS(TLSFiles(tls_ca=tls.ca, tls_cert=tls.client_cert, tls_key=tls.client_key))
        async with await CacheClient.from_nodes(
            infos, namespace="ns", local="never", data_ssl=client_ssl_context(str(tls.ca)), tls=mutual
        ) as client:
            assert await client.get(b"m") == b"mutual"  # over gRPC
        async with await CacheClient.from_nodes(infos, namespace="ns", local="never", tls=mutual) as client:
            assert await client.get(b"m") == b"mutual"
            data = client._nodes["n0"].data
            assert data is not None
            await eventually(lambda: data.connected, timeout=10, what="the mutual-TLS data-plane connection")
            assert client._nodes["n0"].data_down_until == 0


async def test_membership_advertises_the_data_endpoint_and_dead_nodes_are_misses() -> None:
    async with process_mesh(cachenodes=1, cachenode_settings={"storage": "memory://?capacity=64MiB"}) as mesh:
        (member,) = await mesh.wait_members("cachenode", 1)
        process = mesh.of_role("cachenode")[0].process
        assert process is not None
        assert member.labels["data-endpoint"] == process.ready["data_endpoint"]
        async with await CacheClient.connect(mesh.metadata_address, local="never", retry_deadline_s=0.3) as client:
            await eventually(lambda: len(client.nodes) == 1, timeout=10)
            assert client.nodes[member.id].data_endpoint == member.labels["data-endpoint"]
            assert await client.batch_put_from([b"a", b"b"], [b"1" * 100, b"2" * 200]) == [True, True]
            assert await client.get_many([b"a", b"b", b"c"]) == [b"1" * 100, b"2" * 200, None]
            assert await client.exists_prefix([b"a", b"b", b"c", b"a"]) == 2
            await mesh.kill(mesh.of_role("cachenode")[0].name)
            out = bytearray(100)
            assert await client.batch_get_into([b"a"], [out]) == [MISS]
            assert await client.get_many([b"a"]) == [None]
            assert await client.put(b"z", b"z") is False
