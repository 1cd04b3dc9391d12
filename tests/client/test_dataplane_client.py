"""The data-plane client against hand-written servers: deadlines, cancellation and garbage answers."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from kvmesh import frames
from kvmesh.client.dataplane import DataPlaneConnecting, DataPlanePool, DataPlaneUnavailable
from kvmesh.frames import Op

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[str]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{srv.sockets[0].getsockname()[1]}"
    finally:
        srv.close()


async def test_a_call_past_its_deadline_cuts_the_connection() -> None:
    seen_eof = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(frames.HEADER_BYTES)  # reads the request, never answers
        while await reader.read(65536):
            pass
        seen_eof.set()

    async with server(silent) as endpoint:
        pool = DataPlanePool(endpoint, call_timeout_s=0.4)
        buffer = memoryview(bytearray(16))
        with pytest.raises(DataPlaneUnavailable, match="in time"):
            await pool.get_into("ns", [b"k"], [buffer])
        await asyncio.wait_for(seen_eof.wait(), 5)  # the connection is gone: no late byte can land
        await pool.close()


async def test_a_cancelled_call_cuts_the_connection() -> None:
    seen_eof = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        seen_eof.set()

    async with server(silent) as endpoint:
        pool = DataPlanePool(endpoint)
        task = asyncio.create_task(pool.get("ns", [b"k"]))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(seen_eof.wait(), 5)
        await pool.close()


async def test_garbage_and_unknown_answers() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(frames.HEADER_BYTES)
        # An answer to a request nobody made (skipped), then bytes that are no frame at all.
        writer.write(frames.encode_codes(Op.EXISTS, 999, b"\x01"))
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n" + bytes(64))
        await writer.drain()
        await reader.read()

    async with server(garbage) as endpoint:
        pool = DataPlanePool(endpoint)
        with pytest.raises(DataPlaneUnavailable):
            await pool.exists("ns", [b"k"])
        await pool.close()


async def test_nobody_listening() -> None:
    async with server(lambda r, w: asyncio.sleep(0)) as endpoint:
        pass
    pool = DataPlanePool(endpoint, connect_timeout_s=1.0)
    with pytest.raises(DataPlaneUnavailable, match="cannot connect"):
        await pool.get("ns", [b"k"])
    await pool.close()


async def test_a_hanging_connect_costs_one_call_a_short_wait_only() -> None:
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts TCP, never answers the TLS handshake

    async with server(mute) as endpoint:
        pool = DataPlanePool(endpoint, ssl_context=ssl.create_default_context(), connect_timeout_s=1.5)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(DataPlaneConnecting):
            await pool.get("ns", [b"k"])
        assert loop.time() - start < 1.0  # waited briefly, not the whole connect timeout
        start = loop.time()
        with pytest.raises(DataPlaneConnecting):
            await pool.get("ns", [b"k"])
        assert loop.time() - start < 0.2  # an attempt is under way: no second wait
        await asyncio.sleep(1.8)  # the attempt timed out
        with pytest.raises(DataPlaneUnavailable, match="a moment ago"):
            await pool.get("ns", [b"k"])
        await pool.close()
