"""How an attached client sends its four data-path calls: gRPC, or the node's local control socket.

Allocate/Seal/Acquire/ReleaseViews are tiny messages; what they cost is the transport. Over
gRPC a call is ~0.3-0.7 ms of Python CPU on a small host, more than copying a 1 MiB block.
A client on the node's host sends the same messages over the Unix socket the node named in
its AttachResponse (frames: kvmesh/control_wire.py), answered in order on one connection:
one write and one read per call. Errors arrive as `grpc.aio.AioRpcError` with the node's
status code, exactly as over gRPC, so callers handle both the same way. When the socket
breaks, calls go over gRPC again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
from typing import Any, Protocol, TypeVar, cast

import grpc

from kvmesh import control_wire as cw
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

log = logging.getLogger("kvmesh.client.control")

M = TypeVar("M")


class Control(Protocol):
    async def allocate(self, request: cachenode_pb2.AllocateRequest) -> cachenode_pb2.AllocateResponse: ...

    async def seal(self, request: cachenode_pb2.SealRequest) -> cachenode_pb2.SealResponse: ...

    async def acquire(self, request: cachenode_pb2.AcquireRequest) -> cachenode_pb2.AcquireResponse: ...

    async def release_views(self, request: cachenode_pb2.ReleaseViewsRequest) -> cachenode_pb2.ReleaseViewsResponse: ...


class GrpcControl:
    """The calls as gRPC unary RPCs (any host)."""

    def __init__(self, stub: cachenode_pb2_grpc.KVCacheStub, timeout: float) -> None:
        self._stub = stub
        self._timeout = timeout

    async def allocate(self, request: cachenode_pb2.AllocateRequest) -> cachenode_pb2.AllocateResponse:
        return await self._stub.Allocate(request, timeout=self._timeout)

    async def seal(self, request: cachenode_pb2.SealRequest) -> cachenode_pb2.SealResponse:
        return await self._stub.Seal(request, timeout=self._timeout)

    async def acquire(self, request: cachenode_pb2.AcquireRequest) -> cachenode_pb2.AcquireResponse:
        return await self._stub.Acquire(request, timeout=self._timeout)

    async def release_views(self, request: cachenode_pb2.ReleaseViewsRequest) -> cachenode_pb2.ReleaseViewsResponse:
        return await self._stub.ReleaseViews(request, timeout=self._timeout)


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details)


_CODES = {c.value[0]: c for c in grpc.StatusCode}


class _Frames(asyncio.Protocol):
    """Parses answers as they arrive and resolves the oldest waiting call with each."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self.sent_at: collections.deque[float] = collections.deque()  # loop time each waiting call was sent
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        start = 0
        while len(buf) - start >= cw.HEADER.size:
            length, kind = cw.HEADER.unpack_from(buf, start)
            end = start + cw.HEADER.size + length
            if len(buf) < end:
                break
            payload = bytes(buf[start + cw.HEADER.size : end])
            start = end
            if not self.waiting:  # an answer nobody asked for: the stream is not ours to trust
                self._fail(rpc_error(grpc.StatusCode.INTERNAL, "unexpected frame on the control socket"))
                return
            future = self.waiting.popleft()
            self.sent_at.popleft()
            if future.done():  # its caller gave up (timeout, cancellation); the answer is dropped
                continue
            if kind == cw.OK:
                future.set_result(payload)
            else:
                code, details = cw.parse_error(payload)
                future.set_exception(rpc_error(_CODES.get(code, grpc.StatusCode.UNKNOWN), details))
        del buf[:start]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(rpc_error(grpc.StatusCode.UNAVAILABLE, f"control socket closed ({exc or 'by the node'})"))

    def _fail(self, error: grpc.aio.AioRpcError) -> None:
        self.sent_at.clear()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if not self.closed.done():
            self.closed.set_result(None)
        if self.transport is not None:
            self.transport.close()


    def check_deadline(self, timeout: float) -> None:
        """Fails every call when the oldest has waited `timeout`: a node that stops answering
        (stopped, overloaded) does not hang its clients; they go back to gRPC."""
        if self.sent_at and asyncio.get_running_loop().time() - self.sent_at[0] > timeout:
            self._fail(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within {timeout:g} s"))


class SocketControl:
    """The calls over the node's local control socket; `broken` once it closed (use gRPC then).

    Deadlines are kept by one watchdog per connection rather than a timer per call (a timer
    costs more than the rest of a call's client side).
    """

    def __init__(self, frames: _Frames, timeout: float) -> None:
        self._frames = frames
        self._timeout = timeout
        self._watchdog: asyncio.TimerHandle | None = None
        self._tick()

    def _tick(self) -> None:
        self._frames.check_deadline(self._timeout)
        if not self._frames.closed.done():
            period = max(0.01, min(1.0, self._timeout / 4))
            self._watchdog = asyncio.get_running_loop().call_later(period, self._tick)

    @classmethod
    async def connect(cls, address: str, session_id: str, timeout: float) -> SocketControl:
        """Connects and binds the connection to the session (OSError / AioRpcError when it cannot)."""
        path = "\0" + address[1:] if address.startswith("@") else address
        loop = asyncio.get_running_loop()
        # Connected here, not by the loop: uvloop refuses abstract-namespace names. A Unix
        # socket's connect completes at once (or fails: no listener, backlog full).
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(min(timeout, 1.0))
            sock.connect(path)
            sock.setblocking(False)
            async with asyncio.timeout(timeout):
                _, frames = await loop.create_unix_connection(_Frames, sock=sock)
        except BaseException:
            sock.close()
            raise
        control = cls(frames, timeout)
        try:
            await control._call(cw.HELLO, session_id.encode())
        except BaseException:
            control.close()
            raise
        return control

    @property
    def broken(self) -> bool:
        return self._frames.closed.done()

    async def _call(self, kind: int, payload: bytes) -> bytes:
        frames = self._frames
        if frames.closed.done() or frames.transport is None:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "control socket closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        frames.waiting.append(future)
        frames.sent_at.append(loop.time())
        frames.transport.write(cw.HEADER.pack(len(payload), kind) + payload)
        return await future

    async def _request(self, kind: int, request: Any, response_type: type[M]) -> M:
        payload = await self._call(kind, request.SerializeToString())
        return response_type.FromString(payload)  # type: ignore[attr-defined]

    async def allocate(self, request: cachenode_pb2.AllocateRequest) -> cachenode_pb2.AllocateResponse:
        return await self._request(cw.ALLOCATE, request, cachenode_pb2.AllocateResponse)

    async def seal(self, request: cachenode_pb2.SealRequest) -> cachenode_pb2.SealResponse:
        return await self._request(cw.SEAL, request, cachenode_pb2.SealResponse)

    async def acquire(self, request: cachenode_pb2.AcquireRequest) -> cachenode_pb2.AcquireResponse:
        return await self._request(cw.ACQUIRE, request, cachenode_pb2.AcquireResponse)

    async def release_views(self, request: cachenode_pb2.ReleaseViewsRequest) -> cachenode_pb2.ReleaseViewsResponse:
        return await self._request(cw.RELEASE, request, cachenode_pb2.ReleaseViewsResponse)

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._frames.transport is not None:
            with contextlib.suppress(Exception):
                self._frames.transport.close()


class PreferSocket:
    """The socket while it works, gRPC otherwise (and from then on)."""

    def __init__(self, socket: SocketControl | None, fallback: GrpcControl) -> None:
        self.socket = socket
        self._grpc = fallback

    def _pick(self) -> Control:
        if self.socket is not None and not self.socket.broken:
            return self.socket
        return self._grpc

    async def allocate(self, request: cachenode_pb2.AllocateRequest) -> cachenode_pb2.AllocateResponse:
        return await self._pick().allocate(request)

    async def seal(self, request: cachenode_pb2.SealRequest) -> cachenode_pb2.SealResponse:
        return await self._pick().seal(request)

    async def acquire(self, request: cachenode_pb2.AcquireRequest) -> cachenode_pb2.AcquireResponse:
        return await self._pick().acquire(request)

    async def release_views(self, request: cachenode_pb2.ReleaseViewsRequest) -> cachenode_pb2.ReleaseViewsResponse:
        return await self._pick().release_views(request)

    def close(self) -> None:
        if self.socket is not None:
            self.socket.close()
