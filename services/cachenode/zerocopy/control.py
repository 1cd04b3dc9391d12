"""The local control socket: the data path's four calls for clients on this host, off gRPC.

A client that attached over gRPC (its Attach stream still is the session: when it breaks,
everything is released) may send Allocate/Seal/Acquire/ReleaseViews over a Unix socket
instead, at a fraction of a gRPC call's cost; the frame format is in kvmesh/control_wire.py.
The socket lives in the abstract namespace (`@kvmesh-ctl-<pid>-<random>`: nothing to clean
up after a crash) and is only useful with a live session id, which only the Attach stream
hands out. One connection per session: a HELLO binds it, the session's end closes it, and
connections are bounded by `--max-sessions` (plus a few waiting for their HELLO, which must
come within `HELLO_TIMEOUT_S`).

Authentication, with a security policy: two checks. The peer's credentials (SO_PEERCRED) must
name this node's own user or root — the only users that can map the node's shared-memory
segment (mode 0600) anyway; any other local user is refused PERMISSION_DENIED before its HELLO.
The HELLO then presents the session id, 128 random bits that only the authenticated Attach stream
hands out: it is the bearer token binding the connection to that session, whose principal every
call acts as (namespace grants, rates and quotas are checked per call, see api.py).

Requests on one connection are answered in order. Calls that never await (a storage without
lower tiers) are served inside `data_received`, with no task per call; the others run in a
task while later frames wait. Memory per connection is bounded: one frame is at most
`MAX_FRAME`, reading pauses while `MAX_QUEUED` frames wait or while the client does not read
its answers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from google.protobuf.message import DecodeError

from kvmesh import control_wire as cw
from kvmesh.runtime.errors import KvmeshError, status_for
from kvmesh.services.cachenode.zerocopy.attachments import Attachment
from kvmesh.v1 import cachenode_pb2

if TYPE_CHECKING:
    from kvmesh.services.cachenode.zerocopy.api import ZeroCopyApi

log = logging.getLogger("kvmesh.cachenode.control")

HELLO_TIMEOUT_S = 5.0
PENDING_HELLOS = 16  # connections allowed to wait for their HELLO at once, beyond the sessions
MAX_QUEUED = 64  # frames read ahead on one connection while an earlier call runs

RESOURCE_EXHAUSTED, INVALID_ARGUMENT, DEADLINE_EXCEEDED, PERMISSION_DENIED = 8, 3, 4, 7
_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def peer_uid(transport: asyncio.BaseTransport) -> int | None:
    """The user id of the process at the other end of a Unix socket (None when unknown)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(socket, "SO_PEERCRED"):
        return None
    try:
        _, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return None
    return int(uid)


class ControlSocket:
    """A Unix-socket listener serving `ZeroCopyApi`'s calls; `address` goes into AttachResponse."""

    def __init__(self, api: ZeroCopyApi, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.api = api
        self.max_connections = max_connections + PENDING_HELLOS
        self._ssl = ssl_context  # TLS-ready; a Unix socket never leaves the host, so off by default
        self.address = f"@kvmesh-ctl-{os.getpid()}-{secrets.token_hex(6)}"
        self._server: asyncio.AbstractServer | None = None
        self.connections: set[_Connection] = set()
        self.calls = 0  # requests answered (tests count the exchanges a batch costs)
        self.types: dict[int, type[Any]] = {
            cw.ALLOCATE: cachenode_pb2.AllocateRequest,
            cw.SEAL: cachenode_pb2.SealRequest,
            cw.ACQUIRE: cachenode_pb2.AcquireRequest,
            cw.RELEASE: cachenode_pb2.ReleaseViewsRequest,
        }
        self.now: dict[int, Callable[[Any], Any]] = {
            cw.ALLOCATE: api.allocate_now,
            cw.SEAL: api.seal_now,
            cw.ACQUIRE: api.acquire_now,
            cw.RELEASE: api.release_views_now,
        }
        self.later: dict[int, Callable[[Any], Awaitable[Any]]] = {
            cw.ALLOCATE: api.handle_allocate,
            cw.SEAL: api.handle_seal,
            cw.ACQUIRE: api.handle_acquire,
            cw.RELEASE: api.handle_release_views,
        }

    async def start(self) -> None:
        if self._server is not None:
            return
        # Bound here, not by the loop: uvloop refuses abstract-namespace names.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + self.address[1:])
            sock.listen(128)
            sock.setblocking(False)
            loop = asyncio.get_running_loop()
            self._server = await loop.create_unix_server(lambda: _Connection(self), sock=sock, ssl=self._ssl)
        except BaseException:
            sock.close()
            raise

    async def close(self) -> None:
        """Stops listening and closes every connection; safe twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for connection in list(self.connections):
            connection.close()
        self.connections.clear()

    def answer(self, kind: int, payload: bytes) -> bytes | Awaitable[bytes]:
        """The answer frame, or an awaitable of it when the call has to wait for a lower tier."""
        self.calls += 1
        message_type = self.types.get(kind)
        if message_type is None:
            return cw.error_frame(INVALID_ARGUMENT, f"unknown frame kind {kind}")
        try:
            request = message_type.FromString(payload)
        except DecodeError:
            return cw.error_frame(INVALID_ARGUMENT, f"undecodable {message_type.__name__}")
        if self.api.calls_complete_at_once:
            return _run(lambda: self.now[kind](request), message_type)
        return self._later(kind, request, message_type)

    async def _later(self, kind: int, request: Any, message_type: type[Any]) -> bytes:
        try:
            response = await self.later[kind](request)
        except Exception as exc:
            return _error(exc, message_type)
        return cw.frame(cw.OK, response.SerializeToString())


def _run(call: Callable[[], Any], message_type: type[Any]) -> bytes:
    try:
        response = call()
    except Exception as exc:
        return _error(exc, message_type)
    return cw.frame(cw.OK, response.SerializeToString())


def _error(exc: Exception, message_type: type[Any]) -> bytes:
    if not isinstance(exc, KvmeshError | ValueError):
        log.error("control call %s failed", message_type.__name__, exc_info=exc)
    code, message = status_for(exc)
    return cw.error_frame(code.value[0], message)


class _Connection(asyncio.Protocol):
    """One client's control connection: HELLO, then requests answered in order."""

    def __init__(self, server: ControlSocket) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._queued: collections.deque[tuple[int, bytes]] = collections.deque()
        self._session: Attachment | None = None
        self._busy: asyncio.Task[None] | None = None
        self._hello_timer: asyncio.TimerHandle | None = None
        self._reading_paused = False
        self._writing_paused = False
        self._closed = False

    # -- transport events ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if len(self._server.connections) >= self._server.max_connections:
            self._fail(RESOURCE_EXHAUSTED, "too many control connections (bounded by --max-sessions)")
            return
        if self._server.api.tenants.enforcing and peer_uid(transport) not in (os.geteuid(), 0):
            self._fail(PERMISSION_DENIED, "the control socket serves only this node's own user (and root)")
            return
        self._server.connections.add(self)
        self._hello_timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self._no_hello)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        buf = self._buffer
        buf += data
        start = 0
        while len(buf) - start >= cw.HEADER.size:
            length, kind = cw.HEADER.unpack_from(buf, start)
            if length > cw.MAX_FRAME:
                self._fail(INVALID_ARGUMENT, f"frame of {length} bytes is over the {cw.MAX_FRAME}-byte limit")
                return
            end = start + cw.HEADER.size + length
            if len(buf) < end:
                break
            self._queued.append((kind, bytes(buf[start + cw.HEADER.size : end])))
            start = end
        del buf[:start]
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._server.connections.discard(self)
        self._unbind()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self._busy is not None:
            self._busy.cancel()
        self._queued.clear()

    def pause_writing(self) -> None:  # the client does not read its answers: stop reading its calls
        self._writing_paused = True
        self._flow()

    def resume_writing(self) -> None:
        self._writing_paused = False
        self._flow()

    # -- serving ---------------------------------------------------------------------------

    def _pump(self) -> None:
        while self._queued and self._busy is None and not self._closed:
            kind, payload = self._queued.popleft()
            if self._session is None:
                self._hello(kind, payload)
                continue
            answer = self._server.answer(kind, payload)
            if isinstance(answer, bytes):
                self._write(answer)
            else:
                self._busy = asyncio.get_running_loop().create_task(self._finish(answer), name="kvmesh-control-call")
        self._flow()

    async def _finish(self, answer: Awaitable[bytes]) -> None:
        try:
            self._write(await answer)
        finally:
            self._busy = None
        self._pump()

    def _hello(self, kind: int, payload: bytes) -> None:
        if kind != cw.HELLO:
            self._fail(INVALID_ARGUMENT, f"the first frame must be HELLO, got kind {kind}")
            return
        try:
            session = self._server.api.session(payload.decode("utf-8", "replace"))
        except KvmeshError as exc:
            code, message = status_for(exc)
            self._fail(code.value[0], message)
            return
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        self._session = session
        session.on_end.append(self.close)  # the session's end closes its control connection
        self._write(cw.frame(cw.OK))

    def _no_hello(self) -> None:
        if self._session is None:
            self._fail(DEADLINE_EXCEEDED, f"no HELLO within {HELLO_TIMEOUT_S:g} s")

    def _flow(self) -> None:
        """Reads only while few frames wait and the client reads its answers (bounded memory)."""
        if self._transport is None or self._closed:
            return
        pause = self._writing_paused or len(self._queued) >= MAX_QUEUED
        if pause and not self._reading_paused:
            self._transport.pause_reading()
            self._reading_paused = True
        elif not pause and self._reading_paused:
            self._transport.resume_reading()
            self._reading_paused = False

    def _write(self, frame: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(frame)

    def _fail(self, code: int, details: str) -> None:
        self._write(cw.error_frame(code, details))
        self.close()

    def close(self) -> None:
        if self._transport is not None and not self._closed:
            self._closed = True
            self._server.connections.discard(self)
            self._unbind()
            self._transport.close()

    def _unbind(self) -> None:
        """Forgets the session's callback, so reconnecting clients do not grow its list."""
        if self._session is not None:
            with contextlib.suppress(ValueError):
                self._session.on_end.remove(self.close)
