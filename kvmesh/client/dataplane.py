"""The client side of the bulk data plane (kvmesh.frames, docs/dataplane.md).

A `DataPlanePool` keeps a few persistent connections to one cache node and pipelines
requests on them (each carries a request id; the node may answer out of order). A PUT is
written as its header and metadata followed by the caller's own buffers (`writelines`, no
join); a GET response is received straight into the caller's buffers when it gave some
(`get_into`), else into one new bytearray per value. A call that times out or is cancelled
cuts its connection: no late byte can land in a buffer the caller has taken back, and no
half-sent value can be published by the node (it aborts values cut short).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Any, cast

from kvmesh import frames
from kvmesh.frames import Flag, FrameError, Op, Status
from kvmesh.runtime.frame_reader import CLOSED, HEADER, META, VALUES, FrameReader

log = logging.getLogger("kvmesh.client.dataplane")

# Over TLS a request's values are handed over a slice at a time, waiting for the transport to
# drain: the TLS layer encrypts all it is given into one buffer at once.
TLS_SLICE_BYTES = 256 * 1024
TLS_HIGH_WATER = 4 * 1024**2
FIRST_CONNECT_WAIT_S = 0.25  # how long a call waits for a new connection before using gRPC
_RESPONSE = int(Flag.RESPONSE)  # a plain int: enum flag arithmetic costs a microsecond per frame
MISS = -1  # get_into: the key is not stored
TOO_SMALL = -2  # get_into: the value is larger than the buffer given for it


class DataPlaneUnavailable(Exception):
    """No connection, or it broke: the caller falls back to gRPC."""


class DataPlaneConnecting(DataPlaneUnavailable):
    """The connection is still being made: this call should use gRPC, later ones the data plane."""


class DataPlaneRefused(Exception):
    """The node answered with an error frame."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{Status(status).name if status in Status._value2member_map_ else status}: {message}")
        self.status = status
        self.message = message


class _Call:
    """One request waiting for its response."""

    __slots__ = ("deadline", "dests", "future", "op", "results")

    def __init__(self, op: Op, future: asyncio.Future[Any], dests: Sequence[memoryview] | None) -> None:
        self.op = op
        self.future = future
        self.dests = dests
        self.results: list[Any] = []
        self.deadline = 0.0


class _Connection(FrameReader):
    """One persistent connection: writes requests, reads responses in place."""

    def __init__(self, tls: bool = False) -> None:
        super().__init__()
        self.tls = tls
        self._write_lock = asyncio.Lock()  # TLS: one request's slices at a time
        self.transport: asyncio.Transport | None = None
        self.calls: dict[int, _Call] = {}
        self._next_id = 1
        self._header: frames.Header | None = None
        self._call: _Call | None = None
        self._sinks: list[tuple[memoryview | None, int]] = []
        self._sink_index = 0
        self._drained: asyncio.Future[None] | None = None
        self._unsent: list[bytes | memoryview] = []  # requests of this loop turn, written together
        self._flush_soon: asyncio.Handle | None = None
        self.closed = asyncio.get_running_loop().create_future()
        # One timer per connection checks the calls' deadlines (cheaper than a timeout per call).
        self._watchdog: asyncio.TimerHandle | None = None
        self._lost_because = ""

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        if self.tls:
            self.transport.set_write_buffer_limits(high=TLS_HIGH_WATER, low=TLS_HIGH_WATER // 4)

    def _part_received(self) -> None:
        try:
            if self._state == HEADER:
                self._on_header()
            elif self._state == META:
                self._on_meta()
            elif self._state == VALUES:
                self._sink_index += 1
                self._next_sink()
            else:
                self._discard_rest()
        except FrameError as exc:
            log.warning("data plane: bad frame from the node: %s", exc)
            self._discard_rest()  # nothing after a bad frame can be trusted
            self.abort()

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = CLOSED
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        self._unsent = []
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        calls, self.calls = self.calls, {}
        error = DataPlaneUnavailable(self._lost_because or f"connection lost: {exc or 'closed by the node'}")
        for call in calls.values():
            if not call.future.done():
                call.future.set_exception(error)
        self.resume_writing()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- reading ---------------------------------------------------------------------------

    def _on_header(self) -> None:
        header = frames.decode_header(self._head)
        if not header.flags & _RESPONSE:
            raise FrameError("the node sent a request frame")
        self._header = header
        self._call = self.calls.get(header.request_id)
        if header.meta_len:
            self._expect(META, memoryview(bytearray(header.meta_len)), header.meta_len)
        else:
            self._on_meta()

    def _on_meta(self) -> None:
        header, call = self._header, self._call
        assert header is not None
        meta = self._target if self._state == META else memoryview(b"")
        assert meta is not None
        self._sinks, self._sink_index = [], 0
        if header.status != Status.OK:
            if call is not None:
                self._finish(call, DataPlaneRefused(header.status, bytes(meta).decode(errors="replace")))
            if header.status == Status.UNAUTHENTICATED and self.transport is not None:
                # The node closes a connection without a principal right after this frame: stop
                # using it now, so the next call opens a new one instead of racing that close.
                self.transport.close()
        elif header.op == Op.GET:
            self._plan_values(header, call, meta)
        elif call is not None:
            self._finish(call, bytes(meta))
        if header.payload_len and not self._sinks:
            self._sinks = [(None, header.payload_len)]
        self._next_sink()

    def _plan_values(self, header: frames.Header, call: _Call | None, meta: memoryview) -> None:
        """Where each value of a GET response goes: the caller's buffer, a new bytearray, or nowhere."""
        lengths = frames.decode_lengths(header.entries, meta)
        if call is None:
            return
        dests = call.dests
        results = call.results
        for i, length in enumerate(lengths):
            if length == frames.MISSING:
                results.append(MISS if dests is not None else None)
                continue
            if dests is None:
                buffer = bytearray(length)
                results.append(buffer)
                self._sinks.append((memoryview(buffer), length))
            elif length <= len(dests[i]):
                results.append(length)
                self._sinks.append((dests[i][:length], length))
            else:
                results.append(TOO_SMALL)
                self._sinks.append((None, length))

    def _next_sink(self) -> None:
        while self._sink_index < len(self._sinks):
            target, size = self._sinks[self._sink_index]
            if size:
                self._expect(VALUES, target, size)
                return
            self._sink_index += 1
        call = self._call
        if call is not None and not call.future.done() and self._header is not None and self._header.op == Op.GET:
            self._finish(call, call.results)
        self._sinks, self._call, self._header = [], None, None
        self._expect_header()

    def _finish(self, call: _Call, outcome: Any) -> None:
        header = self._header
        if header is not None:
            self.calls.pop(header.request_id, None)
        if call.future.done():
            return
        if isinstance(outcome, Exception):
            call.future.set_exception(outcome)
        else:
            call.future.set_result(outcome)

    # -- requests --------------------------------------------------------------------------

    def new_id(self) -> int:
        request_id = self._next_id
        self._next_id = (self._next_id % 0xFFFFFFFF) + 1
        return request_id

    async def call(
        self, request_id: int, head: bytes, payload: Sequence[memoryview], call: _Call, timeout_s: float
    ) -> Any:
        if not self.usable:
            raise DataPlaneUnavailable("connection closed")
        loop = asyncio.get_running_loop()
        call.deadline = loop.time() + timeout_s
        self.calls[request_id] = call
        if self._watchdog is None:
            self._watchdog = loop.call_later(timeout_s / 4, self._watch, timeout_s / 4)
        try:
            if self.tls:
                async with self._write_lock:
                    await self._write_sliced(head, payload)
            else:
                if self._drained is not None:
                    await asyncio.shield(self._drained)
                self._write_soon(head, payload)
            return await call.future
        except asyncio.CancelledError:
            self.abort()  # the caller's buffers must not be read or written any more
            raise

    def _write_soon(self, head: bytes, payload: Sequence[memoryview]) -> None:
        """Queues a request; the requests of one loop turn leave in one `writelines` (references, no copy)."""
        self._writer()  # raises now if the connection is gone
        self._unsent.append(head)
        self._unsent.extend(payload)
        if self._flush_soon is None:
            self._flush_soon = asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_soon = None
        parts, self._unsent = self._unsent, []
        if parts and self.usable:
            self._writer().writelines(parts)

    def _watch(self, interval: float) -> None:
        """Cuts the connection when a call is past its deadline (its buffers must not be touched later)."""
        self._watchdog = None
        if not self.calls or not self.usable:
            return
        now = asyncio.get_running_loop().time()
        late = [call for call in self.calls.values() if call.deadline <= now]
        if late:
            self._lost_because = "no answer in time"
            self.abort()
            return
        self._watchdog = asyncio.get_running_loop().call_later(interval, self._watch, interval)

    def _writer(self) -> asyncio.Transport:
        if self.transport is None or self.transport.is_closing():
            raise DataPlaneUnavailable("connection closed")
        return self.transport

    async def _write_sliced(self, head: bytes, payload: Sequence[memoryview]) -> None:
        self._writer().write(head)
        for value in payload:
            for offset in range(0, len(value), TLS_SLICE_BYTES):
                if self._drained is not None:
                    await asyncio.shield(self._drained)
                self._writer().write(value[offset : offset + TLS_SLICE_BYTES])

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing()


def client_ssl_context(
    ca_file: str | None = None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A TLS client context trusting `ca_file` (or the system CAs), with an optional client certificate.

    `CacheClient` builds its own from the process's --tls-* files (or its `tls=`); this is for
    callers that drive a `DataPlanePool` directly."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_file)
    if cert_file:
        context.load_cert_chain(cert_file, key_file)
    return context


def _load(connection: _Connection) -> int:
    return len(connection.calls)


class DataPlanePool:
    """Persistent, pipelined connections to one node's data plane."""

    def __init__(
        self,
        endpoint: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connections: int = 2,
        connect_timeout_s: float = 2.0,
        call_timeout_s: float = 30.0,
        retry_after_s: float = 5.0,
        token: Callable[[], str | None] | None = None,
        server_hostname: str | None = None,
    ) -> None:
        host, _, port = endpoint.rpartition(":")
        self._token = token
        self._server_hostname = server_hostname
        self.endpoint = endpoint
        self._host = host.strip("[]")
        self._port = int(port)
        self._ssl = ssl_context
        self._size = max(1, connections)
        self._connect_timeout_s = connect_timeout_s
        self._call_timeout_s = call_timeout_s
        self._connections: list[_Connection] = []
        self._connecting: asyncio.Task[_Connection] | None = None
        self._first_wait_s = min(connect_timeout_s, FIRST_CONNECT_WAIT_S)
        self._retry_after_s = retry_after_s
        self._retry_at = 0.0
        self._closed = False

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(tls=self._ssl is not None),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=(self._server_hostname or self._host) if self._ssl is not None else None,
                )
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            raise DataPlaneUnavailable(f"cannot connect to {self.endpoint}: {exc}") from None
        token = self._token() if self._token is not None else None
        if token:
            await self._authenticate(protocol, token)
        self._connections.append(protocol)
        return protocol

    async def _authenticate(self, connection: _Connection, token: str) -> None:
        """Sends the connection's AUTH frame (once, first) and waits for the node to accept it."""
        request_id = connection.new_id()
        call = _Call(Op.AUTH, asyncio.get_running_loop().create_future(), None)
        try:
            await connection.call(request_id, frames.encode_auth(request_id, token), (), call,
                                  self._connect_timeout_s)
        except (DataPlaneRefused, DataPlaneUnavailable) as exc:
            connection.abort()
            raise DataPlaneUnavailable(f"{self.endpoint} did not accept the token: {exc}") from None

    async def _connection(self) -> _Connection:
        if self._closed:
            raise DataPlaneUnavailable("pool closed")
        connections = self._connections
        if not all(c.usable for c in connections):
            connections = self._connections = [c for c in connections if c.usable]
        idle = min(connections, key=_load, default=None)
        if idle is not None and (not idle.calls or len(self._connections) >= self._size):
            return idle
        loop = asyncio.get_running_loop()
        connecting, started = self._connecting, False
        if connecting is None:
            if loop.time() < self._retry_at:
                raise DataPlaneUnavailable(f"{self.endpoint} failed to connect a moment ago")
            connecting = self._connecting = loop.create_task(self._open())
            connecting.add_done_callback(self._connected)
            started = True
        if idle is not None:
            return idle  # use a busy one now rather than wait for the new one
        if not started:
            raise DataPlaneConnecting(f"still connecting to {self.endpoint}")
        # The call that starts a connection waits for it only briefly (a filtered port may take
        # the whole connect timeout to fail): past that it uses gRPC while the connect goes on.
        done, _ = await asyncio.wait([connecting], timeout=self._first_wait_s)
        if not done:
            raise DataPlaneConnecting(f"still connecting to {self.endpoint}")
        return connecting.result()

    def _connected(self, task: asyncio.Task[_Connection]) -> None:
        self._connecting = None
        if not task.cancelled() and task.exception() is not None:
            self._retry_at = asyncio.get_running_loop().time() + self._retry_after_s

    @property
    def connected(self) -> bool:
        """Whether a connection is open now."""
        return any(c.usable for c in self._connections)

    async def _request(
        self,
        op: Op,
        namespace: str,
        keys: Sequence[bytes],
        *,
        sizes: Sequence[int] | None = None,
        payload: Sequence[memoryview] = (),
        ttl_seconds: int = 0,
        flags: int = 0,
        dests: Sequence[memoryview] | None = None,
    ) -> Any:
        connection = await self._connection()
        request_id = connection.new_id()
        head = frames.encode_request(op, request_id, namespace, keys, sizes, ttl_seconds, flags)
        call = _Call(op, asyncio.get_running_loop().create_future(), dests)
        return await connection.call(request_id, head, payload, call, self._call_timeout_s)

    async def put(
        self, namespace: str, keys: Sequence[bytes], values: Sequence[memoryview], ttl_seconds: int = 0
    ) -> bytes:
        """Stores values whole; returns one status byte per key (0: stored)."""
        values = [v if v.format == "B" and v.ndim == 1 else v.cast("B") for v in values]
        sizes = [v.nbytes for v in values]
        payload = [v for v in values if v.nbytes]
        codes: bytes = await self._request(
            Op.PUT, namespace, keys, sizes=sizes, payload=payload, ttl_seconds=ttl_seconds
        )
        return codes

    async def get(
        self, namespace: str, keys: Sequence[bytes], stop_at_first_miss: bool = False
    ) -> list[bytearray | None]:
        """Values in new buffers (None: missing; fewer entries after a miss with stop_at_first_miss)."""
        flags = Flag.STOP_AT_FIRST_MISS if stop_at_first_miss else 0
        out: list[bytearray | None] = await self._request(Op.GET, namespace, keys, flags=flags)
        return out + [None] * (len(keys) - len(out))

    async def get_into(
        self, namespace: str, keys: Sequence[bytes], buffers: Sequence[memoryview], stop_at_first_miss: bool = False
    ) -> list[int]:
        """Reads each value into its buffer; per key its size, MISS or TOO_SMALL."""
        flags = Flag.STOP_AT_FIRST_MISS if stop_at_first_miss else 0
        out: list[int] = await self._request(Op.GET, namespace, keys, flags=flags, dests=buffers)
        return out + [MISS] * (len(keys) - len(out))

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        answers: bytes = await self._request(Op.EXISTS, namespace, keys)
        return [bool(a) for a in answers]

    async def delete(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        answers: bytes = await self._request(Op.DELETE, namespace, keys)
        return [bool(a) for a in answers]

    async def close(self) -> None:
        """Closes every connection (calls in flight fail with DataPlaneUnavailable)."""
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        connections, self._connections = self._connections, []
        for connection in connections:
            if connection.transport is not None:
                connection.transport.close()
        for connection in connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await connection.closed
