"""get_into / put_from and their batch forms on the local path: caller-owned buffers of every
kind, one control exchange per batch, and the local control socket's behaviour."""

from __future__ import annotations

import asyncio
import os
import struct

import grpc
import numpy as np
import pytest

from kvmesh import control_wire as cw
from kvmesh.client.local import LocalDataPath
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import cachenode_pb2
from tests.fastpath.harness import Node, zerocopy_node

NS = "buf"
KiB = 1 << 10


def _control_calls(node: Node) -> int:
    assert node.zerocopy is not None and node.zerocopy.control is not None
    return int(node.zerocopy.control.calls)


async def test_a_batch_of_32_costs_one_exchange_each_way() -> None:
    async with zerocopy_node("memory://?capacity=32MiB&arena=shm") as node:
        # Releases wait for the next read (a long delay: no timer flush during the test).
        path = await LocalDataPath.open(node.stub, release_delay_s=30)
        try:
            assert path.over_socket  # the calls go over the node's Unix socket, not gRPC
            keys = [f"k{i}".encode() for i in range(32)]
            values = [np.frombuffer(os.urandom(64 * KiB), dtype=np.uint8) for _ in keys]
            before = _control_calls(node)
            assert await path.batch_put_from(NS, keys, values) == [64 * KiB] * 32
            assert _control_calls(node) - before == 2  # one Allocate, one Seal
            outs = [np.zeros(64 * KiB, dtype=np.uint8) for _ in keys]
            before = _control_calls(node)
            assert await path.batch_get_into(NS, keys, outs) == [64 * KiB] * 32
            assert _control_calls(node) - before == 1  # one Acquire
            assert all(np.array_equal(o, v) for o, v in zip(outs, values, strict=True))
            assert node.zerocopy is not None and node.zerocopy.table is not None
            (session,) = node.zerocopy.table._sessions.values()
            assert len(session.views) == 32
            await path.batch_get_into(NS, keys, outs)  # carries the first read's 32 releases
            assert _control_calls(node) - before == 2
            assert len(session.views) == 32  # not 64: the first read's views were released
        finally:
            await path.close()


async def test_get_into_and_put_from_take_every_kind_of_buffer() -> None:
    torch = pytest.importorskip("torch")
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        try:
            raw = os.urandom(4096)
            # bytes, bytearray, memoryview, numpy of another dtype, a bf16 torch tensor.
            tensor = torch.randn(1024, dtype=torch.bfloat16)
            sources = [raw, bytearray(raw), memoryview(raw), np.arange(512, dtype=np.float64), tensor]
            keys = [f"s{i}".encode() for i in range(len(sources))]
            sizes = await path.batch_put_from(NS, keys, sources)
            assert sizes == [4096, 4096, 4096, 4096, 2048]
            assert await node.storage.get(NS, b"s3") == np.arange(512, dtype=np.float64).tobytes()
            assert await node.storage.get(NS, b"s4") == tensor.view(torch.uint8).numpy().tobytes()

            into_tensor = torch.zeros(1024, dtype=torch.bfloat16)
            assert await path.get_into(NS, b"s4", into_tensor) == 2048
            assert torch.equal(into_tensor, tensor)
            into_array = np.zeros(512, dtype=np.float64)
            assert await path.get_into(NS, b"s3", into_array) == 4096
            assert np.array_equal(into_array, np.arange(512, dtype=np.float64))
            bigger = bytearray(5000)  # the value lands at the start; the rest is untouched
            bigger[-1] = 7
            assert await path.get_into(NS, b"s0", memoryview(bigger)) == 4096
            assert bytes(bigger[:4096]) == raw and bigger[-1] == 7
            if torch.cuda.is_available():  # pinned host memory needs a CUDA driver
                pinned = torch.zeros(4096, dtype=torch.uint8).pin_memory()
                assert await path.get_into(NS, b"s1", pinned) == 4096
                assert bytes(pinned.numpy()) == raw
                assert await path.put_from(NS, b"p", pinned) == 4096

            untouched = np.full(8, 9, dtype=np.uint8)
            got = await path.batch_get_into(NS, [b"s0", b"absent"], [bytearray(4096), untouched])
            assert got == [4096, None] and (untouched == 9).all()  # a miss leaves its buffer alone
        finally:
            await path.close()


async def test_buffers_that_cannot_take_a_value_are_refused_before_anything_moves() -> None:
    torch = pytest.importorskip("torch")
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        try:
            await path.put_from(NS, b"k", os.urandom(1000))
            small = bytearray(10)
            with pytest.raises(ValueError, match="does not fit"):
                await path.batch_get_into(NS, [b"k", b"k"], [bytearray(1000), small])
            assert small == bytearray(10)
            with pytest.raises(TypeError, match="read-only"):
                await path.get_into(NS, b"k", b"immutable bytes" * 100)
            with pytest.raises(ValueError, match="contiguous"):
                await path.get_into(NS, b"k", np.zeros((100, 100), dtype=np.uint8)[:, ::2])
            with pytest.raises(ValueError, match="contiguous"):
                await path.put_from(NS, b"t", torch.zeros(64, 64).t())
            with pytest.raises(ValueError, match="keys for"):
                await path.batch_put_from(NS, [b"a", b"b"], [b"x"])
            # Nothing was left pinned or half-written by the refusals.
            assert node.zerocopy is not None and node.zerocopy.table is not None
            table = node.zerocopy.table

            def nothing_pinned() -> bool:
                assert sum(len(s.views) for s in table._sessions.values()) == 0
                return True

            await eventually(nothing_pinned)
            assert await path.get(NS, b"k") is not None and await path.get(NS, b"t") is None
        finally:
            await path.close()


async def test_without_the_control_socket_calls_go_over_grpc() -> None:
    async with zerocopy_node(local_control_socket=False) as node:
        path = await LocalDataPath.open(node.stub)
        try:
            assert not path.over_socket
            assert await path.put_from(NS, b"k", b"v" * 100) == 100
            out = bytearray(100)
            assert await path.get_into(NS, b"k", out) == 100 and out == b"v" * 100
        finally:
            await path.close()


async def _raw(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect("\0" + address[1:])
    sock.setblocking(False)
    return await asyncio.open_unix_connection(sock=sock)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    length, kind = cw.HEADER.unpack(await asyncio.wait_for(reader.readexactly(cw.HEADER.size), 10))
    return kind, await reader.readexactly(length)


async def test_the_control_socket_refuses_bad_input_and_keeps_serving() -> None:
    async with zerocopy_node() as node:
        assert node.zerocopy is not None and node.zerocopy.control is not None
        address = node.zerocopy.control.address
        path = await LocalDataPath.open(node.stub)
        try:
            # A session id nobody was given: NOT_FOUND, connection closed.
            reader, writer = await _raw(address)
            writer.write(cw.frame(cw.HELLO, b"0123456789abcdef"))
            kind, payload = await _answer(reader)
            assert kind == cw.ERROR and cw.parse_error(payload)[0] == grpc.StatusCode.NOT_FOUND.value[0]
            assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            # A request before HELLO, then an oversized frame after one: INVALID_ARGUMENT, closed.
            for frames in (
                [cw.frame(cw.ACQUIRE, b"")],
                [cw.frame(cw.HELLO, path.session_id.encode()), struct.pack("<IB", cw.MAX_FRAME + 1, cw.ACQUIRE)],
            ):
                reader, writer = await _raw(address)
                writer.write(b"".join(frames))
                kind, payload = await _answer(reader)
                if kind == cw.OK:  # the HELLO's answer
                    kind, payload = await _answer(reader)
                assert kind == cw.ERROR and cw.parse_error(payload)[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
                assert await asyncio.wait_for(reader.read(), 10) == b""
                writer.close()
            # Undecodable bodies and unknown kinds get an error each; the connection stays.
            reader, writer = await _raw(address)
            writer.write(cw.frame(cw.HELLO, path.session_id.encode()) + cw.frame(cw.SEAL, b"\xff\xff\xff")
                         + cw.frame(77, b"") + cw.frame(cw.RELEASE, cachenode_pb2.ReleaseViewsRequest(
                             session_id=path.session_id).SerializeToString()))
            assert (await _answer(reader))[0] == cw.OK
            for _ in range(2):
                kind, payload = await _answer(reader)
                assert kind == cw.ERROR and cw.parse_error(payload)[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
            kind, payload = await _answer(reader)
            assert kind == cw.OK and cachenode_pb2.ReleaseViewsResponse.FromString(payload).released == 0
            writer.close()
            # The real client was never disturbed.
            assert await path.put_from(NS, b"k", b"fine") == 4 and await path.get(NS, b"k") == b"fine"
            assert path.over_socket
        finally:
            await path.close()
        # The session's end closes its control connections.
        control = node.zerocopy.control

        def closed() -> bool:
            assert not control.connections
            return True

        await eventually(closed)


async def test_calls_fall_back_to_grpc_when_the_socket_breaks() -> None:
    async with zerocopy_node() as node:
        path = await LocalDataPath.open(node.stub)
        try:
            assert path.over_socket
            assert node.zerocopy is not None and node.zerocopy.control is not None
            for connection in list(node.zerocopy.control.connections):
                connection.close()
            await eventually(lambda: not path.over_socket)
            assert await path.put_from(NS, b"k", b"after") == 5  # over gRPC now
            assert await path.get(NS, b"k") == b"after"
        finally:
            await path.close()


async def test_reconnecting_clients_do_not_grow_the_node() -> None:
    async with zerocopy_node() as node:
        assert node.zerocopy is not None and node.zerocopy.control is not None
        control = node.zerocopy.control
        path = await LocalDataPath.open(node.stub)
        try:
            (session,) = node.zerocopy.table._sessions.values()  # type: ignore[union-attr]
            for _ in range(20):  # connect, bind to the session, go away
                reader, writer = await _raw(control.address)
                writer.write(cw.frame(cw.HELLO, path.session_id.encode()))
                assert (await _answer(reader))[0] == cw.OK
                writer.close()
                await writer.wait_closed()

            def settled() -> bool:
                assert len(control.connections) == 1 and len(session.on_end) == 1  # the real client's
                return True

            await eventually(settled)
            assert await path.put_from(NS, b"k", b"still") == 5
        finally:
            await path.close()
