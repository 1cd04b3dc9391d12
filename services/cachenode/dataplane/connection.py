"""One data-plane connection on the node: a buffered protocol that reads frames in place.

Reading is the shared frame state machine (`kvmesh.runtime.frame_reader`): the 32 header
bytes and the request's metadata through a staging buffer (one receive takes several pipelined
requests), then each PUT value into the memory `Storage.begin_write` reserved for it (the
arena slot itself on a zero-copy storage; small values are copied there from the stage).
Responses written while one receive's requests are handled leave in one `writelines` at the
end of that loop turn. A value is published only once its last
byte arrived; a connection that breaks mid-value aborts the write, so nothing partial is
ever stored. GET responses are written with `writelines` from pinned views of the stored
values (no copy); the pins are released once the transport has handed every byte to the
kernel, which the write-buffer limit of 0 reports through `resume_writing`.

Bounds: a frame's metadata and payload are checked against the limits before anything is
allocated; the node-wide budget of PUT bytes in flight is shared by every connection; a
connection whose unsent responses pass a frame's worth stops being read until they drain;
a connection that moves less than `min_rate_bytes` per second while busy, or idles, is cut.

Identity: over mutual TLS the connection's principal is the client certificate's subject Common
Name; an AUTH frame (a bearer token, sent once at connection start) names the principal the
policy gives that token's digest, and takes precedence, as in gRPC. With a policy in force, a
request on a connection without a principal is answered UNAUTHENTICATED and the connection
closes; an unknown token likewise. Each request then passes the node's tenant gate (namespace
permission, rate, quota) before the storage sees it; a refused request is answered with its
error frame and the connection goes on.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

from kvmesh import frames
from kvmesh.frames import Flag, FrameError, Header, Op, Status
from kvmesh.runtime.errors import KvmeshError, ResourceExhausted, Unavailable, status_for
from kvmesh.runtime.frame_reader import CLOSED, HEADER, META, VALUES, FrameReader
from kvmesh.security.identity import Principal, token_digest
from kvmesh.services.cachenode.limits import MAX_NAMESPACE_BYTES
from kvmesh.services.cachenode.storage.base import Pinned
from kvmesh.services.cachenode.storage.write import ReservedWrite, Write, WriteBatch

if TYPE_CHECKING:
    from kvmesh.services.cachenode.dataplane.server import DataPlaneServer
    from kvmesh.services.cachenode.storage.base import Storage

log = logging.getLogger("kvmesh.cachenode.dataplane")

# Over TLS a response is handed to the TLS layer a slice at a time while its buffer is below the
# high-water mark: it encrypts everything it is given into one buffer at once, so a whole batch
# would be copied (twice) before its first byte is sent. The TLS layer copies anyway, so slices
# are copied out of the pinned values and the pins go as soon as the last slice is handed over.
TLS_SLICE_BYTES = 256 * 1024
TLS_HIGH_WATER = 4 * 1024**2
TLS_LOW_WATER = 1024**2
_OPS = frozenset(int(op) for op in Op)
# Plain ints: enum flag arithmetic costs a microsecond per frame.
_RESPONSE = int(Flag.RESPONSE)
_STOP_AT_FIRST_MISS = int(Flag.STOP_AT_FIRST_MISS)


def _certificate_principal(transport: asyncio.BaseTransport) -> Principal | None:
    """The verified client certificate's subject CN (TLS with client certificates), else None."""
    peercert = transport.get_extra_info("peercert")
    for rdn in (peercert or {}).get("subject", ()):
        for field, value in rdn:
            if field == "commonName" and value.strip():
                return Principal(value.strip(), "certificate")
    return None


def status_code(exc: BaseException) -> int:
    """The frame status of an exception (the gRPC code number)."""
    code, _ = status_for(exc)
    return int(code.value[0])


class DataConnection(FrameReader):
    """Serves the requests of one client connection, pipelined, in the order they arrive."""

    def __init__(self, node: DataPlaneServer) -> None:
        super().__init__()
        self._node = node
        self._transport: asyncio.Transport | None = None
        self._header: Header | None = None
        self._principal: Principal | None = None  # from the client certificate, or an AUTH frame
        # The PUT being received.
        self._namespace = ""
        self._ttl = 0
        self._keys: list[bytes] = []
        self._sizes: list[int] = []
        self._codes = bytearray()
        self._index = 0
        self._write: Write | None = None
        self._deferred: list[tuple[int, Write]] = []
        self._budget = 0
        self._answer = True  # False when the frame was already answered with an error
        # Sending.
        self._tls = node.ssl_context is not None
        self._outq: collections.deque[bytes | memoryview] = collections.deque()  # TLS: not yet handed over
        self._unsent: list[bytes | memoryview] = []  # plain: written together at the end of the loop turn
        self._flush_soon: asyncio.Handle | None = None
        self._held: list[Pinned] = []
        self._held_bytes = 0
        self._writing_paused = False
        self._reading_paused = False
        self._tasks: set[asyncio.Task[None]] = set()
        # Progress, for the stall and idle checks.
        self._rx = 0
        self._tx = 0
        self._marks = (0, 0)
        self._idle_s = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's transports are not its subclasses
        if self._tls:
            self._transport.set_write_buffer_limits(high=TLS_HIGH_WATER, low=TLS_LOW_WATER)
        else:
            self._transport.set_write_buffer_limits(high=0)  # resume_writing = everything sent: pins may go
        self._node.connections.add(self)
        self._principal = _certificate_principal(self._transport)
        self._schedule_check()

    def buffer_updated(self, nbytes: int) -> None:
        self._rx += nbytes
        super().buffer_updated(nbytes)

    def _part_received(self) -> None:
        try:
            if self._state == HEADER:
                self._on_header()
            elif self._state == META:
                self._on_meta()
            elif self._state == VALUES:
                self._on_value()
            else:
                self._discard_rest()  # closing: swallow whatever still arrives
        except FrameError as exc:
            self._fail(Status.INVALID_ARGUMENT, str(exc))
        except Exception as exc:  # a bug must not take the node down: this connection ends
            log.exception("data-plane connection failed")
            self._fail(status_code(exc), f"internal error: {type(exc).__name__}")

    def _hold_frames(self) -> bool:
        return self._reading_paused

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._tls:
            self._pump()
        elif not self._unsent:  # else pins of responses not yet written: `_flush` releases them
            self._release_held()
        self._update_reading()

    def eof_received(self) -> bool | None:
        return None  # close: a half-closed client has nothing more to ask

    def connection_lost(self, exc: Exception | None) -> None:
        self._state = CLOSED
        if self._flush_soon is not None:
            self._flush_soon.cancel()
            self._flush_soon = None
        self._unsent = []
        self._node.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._write is not None:
            self._write.abort()  # a half-received value is never published
            self._write = None
        for _, write in self._deferred:
            write.abort()
        self._deferred = []
        self._give_budget()
        self._outq.clear()
        self._release_held()
        for task in self._tasks:
            task.cancel()

    # -- reading ---------------------------------------------------------------------------

    def _on_header(self) -> None:
        header = frames.decode_header(self._head)
        self._header = header
        node = self._node
        if header.flags & _RESPONSE:
            raise FrameError("a client sent a response frame")
        if header.op == Op.AUTH:
            if header.payload_len or header.entries or not 0 < header.meta_len <= frames.MAX_TOKEN_BYTES:
                raise FrameError(f"an AUTH frame carries a token of 1..{frames.MAX_TOKEN_BYTES} bytes and nothing else")
            self._expect(META, memoryview(bytearray(header.meta_len)), header.meta_len)
            return
        if header.entries > node.dp_limits.max_batch_keys:
            raise FrameError(f"{header.entries} keys in one frame (at most {node.dp_limits.max_batch_keys})")
        bound = frames.request_meta_bound(
            header.entries, MAX_NAMESPACE_BYTES, node.limits.max_key_bytes, header.op == Op.PUT
        )
        if header.meta_len > bound:
            raise FrameError(f"{header.meta_len} bytes of metadata for {header.entries} keys (at most {bound})")
        if header.op not in _OPS:  # answered, skipped, and the connection goes on
            skip = header.meta_len + header.payload_len
            if skip > node.dp_limits.max_frame_bytes:
                raise FrameError(f"unknown op {header.op} with {skip} bytes to skip")
            self._send_error(header, Status.UNIMPLEMENTED, f"unknown op {header.op}")
            self._answer = False
            self._keys, self._sizes, self._index = [], [skip], 0
            self._start_value()
            return
        if header.op == Op.PUT:
            if header.payload_len > node.dp_limits.max_frame_bytes:
                self._fail(
                    Status.RESOURCE_EXHAUSTED,
                    f"{header.payload_len} bytes of values in one frame (at most {node.dp_limits.max_frame_bytes})",
                )
                return
        elif header.payload_len:
            raise FrameError(f"op {header.op} carries no values but the frame announces {header.payload_len} bytes")
        if header.meta_len == 0:
            raise FrameError("a request without metadata")
        self._expect(META, memoryview(bytearray(header.meta_len)), header.meta_len)

    def _on_meta(self) -> None:
        header = self._header
        assert header is not None and self._target is not None
        if header.op == Op.AUTH:
            token = bytes(self._target)
            self._expect_header()
            self._authenticate(header, token)
            return
        tenants = self._node.tenants
        if tenants.enforcing and self._principal is None:
            self._fail(Status.UNAUTHENTICATED, "this node enforces a security policy: connect with a client "
                                               "certificate (mutual TLS) or send an AUTH frame with a token first")
            return
        request = frames.decode_request(header.op, header.entries, self._target)
        self._expect_header()
        if header.op == Op.PUT:
            self._begin_put(header, request)
            return
        try:
            storage = self._storage()
            self._node.limits.check_namespace(request.namespace)
            self._node.limits.check_keys(request.keys)
            if header.op == Op.DELETE:
                tenants.delete(self._principal, request.namespace)
            else:
                tenants.read(self._principal, request.namespace)
        except KvmeshError as exc:
            self._send_error(header, status_code(exc), str(exc))
            return
        if header.op == Op.GET:
            self._get(storage, header, request.namespace, request.keys)
        else:
            self._spawn(self._exists_or_delete(storage, header, request.namespace, request.keys))

    def _authenticate(self, header: Header, token: bytes) -> None:
        """An AUTH frame: the token's principal becomes the connection's (ignored without a policy)."""
        tenants = self._node.tenants
        if tenants.enforcing:
            principal = tenants.authorizer.principal_for_token(token_digest(token.decode(errors="replace").strip()))
            if principal is None:
                self._fail(Status.UNAUTHENTICATED, "bad credentials: unknown token")
                return
            self._principal = principal
        self._send([frames.encode_codes(Op.AUTH, header.request_id, b"")])

    def _storage(self) -> Storage:
        storage = self._node.storage
        if storage is None:
            raise Unavailable("cache node is starting: storage not ready")
        return storage

    # -- PUT -------------------------------------------------------------------------------

    def _begin_put(self, header: Header, request: frames.Request) -> None:
        if sum(request.sizes) != header.payload_len:
            raise FrameError(f"values sum to {sum(request.sizes)} bytes but the frame announces {header.payload_len}")
        self._namespace, self._ttl, self._keys, self._sizes = (
            request.namespace,
            request.ttl_seconds,
            request.keys,
            request.sizes,
        )
        self._codes = bytearray(len(request.keys))
        self._index = 0
        self._answer = True
        try:
            self._storage()
            limits = self._node.limits
            limits.check_namespace(request.namespace)
            limits.check_keys(request.keys)
            for size in request.sizes:
                limits.check_size(size)
            self._node.tenants.write(self._principal, request.namespace, list(zip(request.keys, request.sizes,
                                                                                  strict=True)))
            if not self._node.budget.take(header.payload_len):
                raise ResourceExhausted(
                    f"the node is receiving {self._node.budget.used} bytes of values already "
                    f"(--data-max-inflight-bytes {self._node.budget.limit}): retry later"
                )
            self._budget = header.payload_len
        except KvmeshError as exc:  # the frame is refused whole: its values are read and dropped
            self._send_error(header, status_code(exc), str(exc))
            self._answer = False
            self._keys, self._sizes = [], [header.payload_len]
        self._state = VALUES
        self._start_value()

    def _start_value(self) -> None:
        """Points the reader at the next value's memory (skipping empty values); ends the frame after the last."""
        while self._index < len(self._sizes):
            size = self._sizes[self._index]
            target: memoryview | None = None
            if self._keys:
                try:
                    self._write = self._storage().begin_write(self._namespace, self._keys[self._index], size, self._ttl)
                    target = self._write.view
                except Exception as exc:  # no room: this value is read and dropped, the others go on
                    self._codes[self._index] = status_code(exc)
                    self._write = None
            if size:
                self._expect(VALUES, target, size)
                return
            self._finish_value()
        self._end_put()

    def _on_value(self) -> None:
        self._finish_value()
        self._start_value()

    def _finish_value(self) -> None:
        write, self._write = self._write, None
        if write is not None:
            if isinstance(write, ReservedWrite):
                write.publish()  # in place: publishing never waits
            else:
                self._deferred.append((self._index, write))
        self._index += 1

    def _end_put(self) -> None:
        header = self._header
        assert header is not None
        self._give_budget()
        self._expect_header()
        if not self._answer:
            return
        if self._deferred:
            deferred, self._deferred = self._deferred, []
            self._spawn(self._commit_deferred(header, deferred, self._codes))
            return
        self._send([frames.encode_codes(Op.PUT, header.request_id, self._codes)])

    async def _commit_deferred(self, header: Header, deferred: list[tuple[int, Write]], codes: bytearray) -> None:
        """Stores buffered values (storages without an arena) with one batch, then answers."""
        batch = WriteBatch(self._storage())
        try:
            for _, write in deferred:
                await batch.commit(write)
            await batch.flush()
        finally:
            for _, write in deferred:
                write.abort()
        failed = {key: exc for key, exc in batch.failed}
        for index, write in deferred:
            exc = failed.get(write.key)
            if exc is not None:
                codes[index] = status_code(exc)
        self._send([frames.encode_codes(Op.PUT, header.request_id, codes)])

    def _give_budget(self) -> None:
        if self._budget:
            self._node.budget.give(self._budget)
            self._budget = 0

    # -- GET, EXISTS, DELETE ---------------------------------------------------------------

    def _get(self, storage: Storage, header: Header, namespace: str, keys: list[bytes]) -> None:
        zero_copy = storage.zero_copy()
        stop = bool(header.flags & _STOP_AT_FIRST_MISS)
        if zero_copy is None:
            self._spawn(self._get_copied(storage, header, namespace, keys, stop))
            return
        lengths: list[int] = []
        parts: list[bytes | memoryview] = []
        pins: list[Pinned] = []
        for key in keys:
            pinned = zero_copy.pin(namespace, key)
            if pinned is None:
                lengths.append(frames.MISSING)
                if stop:
                    break
                continue
            pins.append(pinned)
            lengths.append(pinned.size)
            if pinned.size:
                parts.append(pinned.view[:])  # its own view object: the pin's view can be released
        parts.insert(0, frames.encode_lengths(header.request_id, lengths))
        self._send(parts, pins)

    async def _get_copied(
        self, storage: Storage, header: Header, namespace: str, keys: list[bytes], stop: bool
    ) -> None:
        try:
            values = await storage.get_many(namespace, keys)
        except Exception as exc:
            self._send_error(header, status_code(exc), status_for(exc)[1])
            return
        lengths: list[int] = []
        parts: list[bytes | memoryview] = []
        for value in values:
            if value is None:
                lengths.append(frames.MISSING)
                if stop:
                    break
                continue
            lengths.append(len(value))
            if value:
                parts.append(value)
        parts.insert(0, frames.encode_lengths(header.request_id, lengths))
        self._send(parts)

    async def _exists_or_delete(self, storage: Storage, header: Header, namespace: str, keys: list[bytes]) -> None:
        try:
            if header.op == Op.EXISTS:
                answers = await storage.exists(namespace, keys) if keys else []
            else:
                answers = []
                for key in keys:
                    answers.append(await storage.delete(namespace, key))
                    self._node.tenants.deleted(namespace, key)
        except Exception as exc:
            self._send_error(header, status_code(exc), status_for(exc)[1])
            return
        self._send([frames.encode_codes(Op(header.op), header.request_id, bytes(1 if a else 0 for a in answers))])

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        self._update_reading()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("data-plane request failed", exc_info=task.exception())
        self._update_reading()

    # -- writing ---------------------------------------------------------------------------

    def _send(self, parts: list[bytes | memoryview], pins: list[Pinned] | None = None) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            for pinned in pins or ():
                pinned.release()
            return
        if pins:
            self._held.extend(pins)
            self._held_bytes += sum(p.size for p in pins)
        if self._tls:
            self._outq.extend(parts)
            self._pump()
        else:
            # Written with the other responses of this loop turn: one system call for all the
            # requests one receive brought (the transport keeps references: no copy).
            self._unsent.extend(parts)
            if self._flush_soon is None:
                self._flush_soon = asyncio.get_running_loop().call_soon(self._flush)
        self._update_reading()

    def _flush(self) -> None:
        if self._flush_soon is not None:
            self._flush_soon.cancel()  # when called early (before a close)
            self._flush_soon = None
        parts, self._unsent = self._unsent, []
        transport = self._transport
        if not parts or transport is None or transport.is_closing():
            return
        transport.writelines(parts)
        self._tx += sum(len(p) for p in parts)
        if self._held and transport.get_write_buffer_size() == 0:
            self._release_held()
            self._update_reading()

    def _pump(self) -> None:
        """TLS: hands queued response bytes to the transport while it is below its high-water mark."""
        transport = self._transport
        assert transport is not None
        while self._outq and not self._writing_paused and not transport.is_closing():
            part = self._outq[0]
            if len(part) > TLS_SLICE_BYTES:
                view = part if isinstance(part, memoryview) else memoryview(part)
                part, self._outq[0] = view[:TLS_SLICE_BYTES], view[TLS_SLICE_BYTES:]
            else:
                self._outq.popleft()
            transport.write(bytes(part))
            self._tx += len(part)
        if not self._outq:
            self._release_held()

    def _release_held(self) -> None:
        held, self._held, self._held_bytes = self._held, [], 0
        for pinned in held:
            pinned.release()

    def _send_error(self, header: Header, status: int, message: str) -> None:
        self._send([frames.encode_error(header.op, header.request_id, status, message)])

    def _fail(self, status: int, message: str) -> None:
        """A frame the connection cannot continue past: an error frame, then the connection closes."""
        header = self._header
        op, request_id = (header.op, header.request_id) if header is not None else (0, 0)
        log.info("data-plane connection closed: %s", message)
        self._send([frames.encode_error(op, request_id, status, message)])
        self._flush()  # before the close below: responses and the error frame go out first
        self._discard_rest()
        if self._write is not None:
            self._write.abort()
            self._write = None
        self._give_budget()
        if self._transport is not None:
            self._transport.close()  # flushes the error frame first

    def _update_reading(self) -> None:
        """Stops reading while too much is unsent or too many requests wait on the storage."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        limits = self._node.dp_limits
        pause = self._held_bytes > limits.max_frame_bytes or len(self._tasks) >= limits.max_pending_ops
        if pause and not self._reading_paused:
            transport.pause_reading()
            self._reading_paused = True
        elif not pause and self._reading_paused:
            transport.resume_reading()
            self._reading_paused = False
            self._take_staged()  # requests that arrived with the last receive but were held back

    # -- stalls and idleness ---------------------------------------------------------------

    def _schedule_check(self) -> None:
        interval = self._node.dp_limits.stall_timeout_s
        self._timer = asyncio.get_running_loop().call_later(interval, self._check)

    def _check(self) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        limits = self._node.dp_limits
        unsent = transport.get_write_buffer_size()
        sent = self._tx - unsent
        progress = (self._rx - self._marks[0]) + (sent - self._marks[1])
        self._marks = (self._rx, sent)
        # In the middle of a frame, unless the node itself stopped reading (storage busy).
        receiving = self._mid_frame and not self._reading_paused
        sending = bool(unsent or self._outq)
        if (receiving or sending) and progress < limits.min_rate_bytes * limits.stall_timeout_s:
            what = "sending a frame" if receiving else "reading its responses"
            log.info(
                "data-plane client too slow %s (%d bytes in %.0f s): closing", what, progress, limits.stall_timeout_s
            )
            if receiving and not sending:
                self._fail(Status.DEADLINE_EXCEEDED, f"frame arriving slower than {limits.min_rate_bytes} bytes/s")
            else:
                transport.abort()
            return
        self._idle_s = 0.0 if progress or self._tasks else self._idle_s + limits.stall_timeout_s
        if self._idle_s >= limits.idle_timeout_s:
            transport.close()
            return
        self._schedule_check()

    def abort(self) -> None:
        """Cuts the connection now (the node is closing)."""
        if self._transport is not None:
            self._transport.abort()
