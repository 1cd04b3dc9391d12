"""The local control socket: the data path's four calls for clients on this host, off gRPC.

A client that attached over gRPC (its Attach stream still is the session: when it breaks,
everything is released) may send Allocate/Seal/Acquire/ReleaseViews over a Unix socket
instead, at a fraction of a gRPC call's cost; the frame format is in kvmesh/control_wire.py.
The socket lives in the abstract namespace (`@kvmesh-ctl-<pid>-<random>`: nothing to clean
up after a crash) and is only useful with a live session id, which only the Attach stream
hands out. One connection per session: a HELLO binds it, the session's end closes it, and
connections are bounded by `--max-sessions` (plus a few waiting for their HELLO, which must
come within `HELLO_TIMEOUT_S`). Requests on one connection are served one after another, so
answers come back in order.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import ssl
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from google.protobuf.message import DecodeError

from kvmesh import control_wire as cw
from kvmesh.runtime.errors import KvmeshError, status_for
from kvmesh.v1 import cachenode_pb2

if TYPE_CHECKING:
    from kvmesh.services.cachenode.zerocopy.api import ZeroCopyApi

log = logging.getLogger("kvmesh.cachenode.control")

HELLO_TIMEOUT_S = 5.0
PENDING_HELLOS = 16  # connections allowed to wait for their HELLO at once, beyond the sessions

Handler = Callable[[Any], Awaitable[Any]]


class ControlSocket:
    """A Unix-socket listener serving `ZeroCopyApi`'s calls; `address` goes into AttachResponse."""

    def __init__(self, api: ZeroCopyApi, max_connections: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._api = api
        self._max = max_connections + PENDING_HELLOS
        self._ssl = ssl_context  # TLS-ready; a Unix socket never leaves the host, so off by default
        self.address = f"@kvmesh-ctl-{os.getpid()}-{secrets.token_hex(6)}"
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: dict[int, tuple[type[Any], Handler]] = {
            cw.ALLOCATE: (cachenode_pb2.AllocateRequest, api.handle_allocate),
            cw.SEAL: (cachenode_pb2.SealRequest, api.handle_seal),
            cw.ACQUIRE: (cachenode_pb2.AcquireRequest, api.handle_acquire),
            cw.RELEASE: (cachenode_pb2.ReleaseViewsRequest, api.handle_release_views),
        }

    async def start(self) -> None:
        if self._server is None:
            self._server = await asyncio.start_unix_server(
                self._serve, path="\0" + self.address[1:], ssl=self._ssl, limit=cw.MAX_FRAME + cw.HEADER.size
            )

    async def close(self) -> None:
        """Stops listening and closes every connection; safe twice."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.close()
        self._connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max:
            writer.write(cw.error_frame(8, "too many control connections (bounded by --max-sessions)"))
            writer.close()
            return
        self._connections.add(writer)
        try:
            await self._session_loop(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away; its session ends with its Attach stream
        except Exception:
            log.exception("control connection failed")
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _read_frame(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bytes] | None:
        length, kind = cw.HEADER.unpack(await reader.readexactly(cw.HEADER.size))
        if length > cw.MAX_FRAME:
            writer.write(cw.error_frame(3, f"frame of {length} bytes is over the {cw.MAX_FRAME}-byte limit"))
            return None
        return kind, await reader.readexactly(length)

    async def _session_loop(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await self._read_frame(reader, writer)
        except TimeoutError:
            writer.write(cw.error_frame(4, f"no HELLO within {HELLO_TIMEOUT_S:g} s"))
            return
        if first is None:
            return
        kind, payload = first
        if kind != cw.HELLO:
            writer.write(cw.error_frame(3, f"the first frame must be HELLO, got kind {kind}"))
            return
        try:
            session = self._api.session(payload.decode("utf-8", "replace"))
        except KvmeshError as exc:
            code, message = status_for(exc)
            writer.write(cw.error_frame(code.value[0], message))
            return
        session.on_end.append(writer.close)  # the session's end closes its control connection
        writer.write(cw.frame(cw.OK))
        while True:
            got = await self._read_frame(reader, writer)
            if got is None:
                return
            kind, payload = got
            writer.write(await self._answer(kind, payload))
            if writer.transport.get_write_buffer_size() > cw.MAX_FRAME:
                await writer.drain()

    async def _answer(self, kind: int, payload: bytes) -> bytes:
        handler = self._handlers.get(kind)
        if handler is None:
            return cw.error_frame(3, f"unknown frame kind {kind}")
        message_type, handle = handler
        try:
            request = message_type.FromString(payload)
        except DecodeError:
            return cw.error_frame(3, f"undecodable {message_type.__name__}")
        try:
            response = await handle(request)
        except (KvmeshError, ValueError) as exc:
            code, message = status_for(exc)
            return cw.error_frame(code.value[0], message)
        except Exception as exc:
            log.exception("control call %s failed", message_type.__name__)
            code, message = status_for(exc)
            return cw.error_frame(code.value[0], message)
        return cw.frame(cw.OK, response.SerializeToString())

