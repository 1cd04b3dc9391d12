"""Whole values from a stream of chunks: BatchPut's write path, independent of gRPC.

Values larger than one message arrive as chunks (namespace, key, total_size, offset, data,
ttl_seconds), each value's chunks in order and one value after another. A value that comes
whole in its first chunk is written straight into the storage's `Write` (see
storage/write.py: its final place in a zero-copy storage's arena, or a buffer). A value in
several chunks goes to a `StagedWrite`, which keeps its chunks as they arrive and takes
room in the storage only when the last byte is in: a client that announces a large value
and stalls evicts nothing and reserves nothing. What the stream holds meanwhile (those
chunks, and values waiting in its write batch) is counted against the node's write budget
(write_budget.py). A value is stored whole or not at all. A bad chunk fails only its own key
(the rest of the stream goes on): the failure is reported as a KeyError, what the value held
is freed, and its remaining chunks are ignored.

Before a value takes any room, `admit(namespace, key, size)` (the node's tenant gate) may refuse
it: over the namespace's quota (RESOURCE_EXHAUSTED) fails that value alone, like a value with no
room; any other refusal (not allowed in the namespace) is raised out of `add`, and the caller
ends the stream. A value charged but then not stored stays charged until the quota's next
reconciliation with the storage (quotas.py), so a quota is never under-counted.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import grpc

from kvmesh.runtime.errors import InvalidArgument, KvmeshError, ResourceExhausted, status_for
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.storage.write import BATCH_BYTES, BATCH_ITEMS, StagedWrite, Write, WriteBatch
from kvmesh.services.cachenode.write_budget import StreamHold, WriteBudget
from kvmesh.v1 import cachenode_pb2

log = logging.getLogger("kvmesh.cachenode")


class PutChunkLike(Protocol):
    """A PutChunk: the generated message, wire.PutChunkView, or a future data plane's own."""

    @property
    def namespace(self) -> str: ...
    @property
    def key(self) -> bytes: ...
    @property
    def total_size(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def data(self) -> bytes | memoryview: ...
    @property
    def ttl_seconds(self) -> int: ...


class _Rejected(Exception):
    """One value of the stream failed; the stream goes on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> _Rejected:
    return _Rejected(grpc.StatusCode.INVALID_ARGUMENT, message)


class ChunkAssembler:
    """Assembles one stream's chunks into committed values: `add` each chunk, then `finish`.

    `stored` and `errors` are the BatchPut answer. Call `abort` (safe twice, and after
    `finish`) when the stream breaks off, so an unfinished value leaves nothing behind.
    """

    def __init__(
        self,
        storage: Storage,
        limits: Limits | None = None,
        batch_items: int = BATCH_ITEMS,
        batch_bytes: int = BATCH_BYTES,
        hold: StreamHold | None = None,
        admit: Callable[[str, bytes, int], Awaitable[None]] | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self._admit = admit
        self._hold = hold or WriteBudget().open("local")
        self.errors: list[cachenode_pb2.KeyError] = []
        self._batch = WriteBatch(storage, batch_items, batch_bytes)
        self._storage = storage
        self._current: Write | None = None
        self._received = 0
        self._skipping: tuple[str, bytes] | None = None  # a failed value whose remaining chunks are ignored

    @property
    def stored(self) -> int:
        """Values stored so far (a batched value counts once its batch is written)."""
        return self._batch.stored

    async def add(self, chunk: PutChunkLike) -> None:
        """Takes the next chunk of the stream."""
        current = self._current
        if current is not None and (chunk.key != current.key or chunk.namespace != current.namespace):
            self._fail(current.namespace, current.key, _invalid(
                f"value incomplete: {self._received} of {current.size} bytes before the next key"
            ))
            current = None
        if current is None:
            if self._skipping == (chunk.namespace, chunk.key) and chunk.offset != 0:
                return
            self._skipping = None
            try:
                await self._admit_value(chunk)
                current = self._begin(chunk)
            except _Rejected as exc:
                self._fail(chunk.namespace, chunk.key, exc)
                return
        try:
            if isinstance(current, StagedWrite):
                await self._make_room(self._received + len(chunk.data))
            self._append(current, chunk)
        except _Rejected as exc:
            self._fail(current.namespace, current.key, exc)
            return
        if self._received < current.size:
            return
        self._current = None
        try:
            await self._batch.commit(current)
        except (KvmeshError, ValueError) as exc:  # a staged value found no room in the storage
            current.abort()
            code, message = status_for(exc)
            self.errors.append(cachenode_pb2.KeyError(key=current.key, code=code.name, message=message))
        await self._account()
        self._collect()

    async def finish(self) -> None:
        """The stream ended: fails an unfinished value and stores what is still batched."""
        current = self._current
        if current is not None:
            self._fail(current.namespace, current.key, _invalid(
                f"stream ended with the value incomplete: {self._received} of {current.size} bytes"
            ))
        await self._batch.flush()
        self._hold.hold(0)
        self._collect()

    def abort(self) -> None:
        """Drops the value being assembled (what it reserved or held is freed at once)."""
        current, self._current = self._current, None
        if current is not None:
            current.abort()
        self._hold.hold(self._batch.pending_bytes)

    def close(self) -> None:
        """The stream is over: drops an unfinished value and returns what it held to the budget."""
        self.abort()
        self._hold.close()

    async def _make_room(self, staged: int) -> None:
        """Counts `staged` bytes of the unfinished value, storing the batch first if that makes room."""
        try:
            self._hold.hold(self._batch.pending_bytes + staged)
            return
        except KvmeshError as exc:
            if not self._batch.pending:
                raise _Rejected(exc.code, str(exc)) from None
        await self._batch.flush()
        self._collect()
        try:
            self._hold.hold(staged)
        except KvmeshError as exc:
            raise _Rejected(exc.code, str(exc)) from None

    async def _account(self) -> None:
        """Counts the batch's waiting values; stores them now when the budget has no room."""
        try:
            self._hold.hold(self._batch.pending_bytes)
        except KvmeshError:
            await self._batch.flush()
            self._hold.hold(0)

    # -- steps ---------------------------------------------------------------------------

    async def _admit_value(self, chunk: PutChunkLike) -> None:
        """Asks the tenant gate about a new value before it takes room (see the module docstring)."""
        if self._admit is None or chunk.offset != 0:
            return  # a value not starting at 0 is refused by `_begin`
        try:
            self.limits.check_namespace(chunk.namespace)
            self.limits.check_key(chunk.key)
        except KvmeshError as exc:
            raise _Rejected(exc.code, str(exc)) from None
        try:
            await self._admit(chunk.namespace, bytes(chunk.key), chunk.total_size or len(chunk.data))
        except ResourceExhausted as exc:
            raise _Rejected(exc.code, str(exc)) from None

    def _begin(self, chunk: PutChunkLike) -> Write:
        """Validates the first chunk of a value and makes room for the whole of it."""
        try:
            self.limits.check_namespace(chunk.namespace)
            self.limits.check_key(chunk.key)
            if chunk.offset != 0:
                raise InvalidArgument(f"chunk out of order: first chunk of a value at offset {chunk.offset}, not 0")
            total = chunk.total_size or len(chunk.data)
            self.limits.check_size(total)
            if len(chunk.data) >= total:  # whole in one message: no byte is missing
                write: Write = self._storage.begin_write(chunk.namespace, chunk.key, total, chunk.ttl_seconds)
            else:
                write = StagedWrite(self._storage, chunk.namespace, chunk.key, total, chunk.ttl_seconds)
        except KvmeshError as exc:
            raise _Rejected(exc.code, str(exc)) from None
        except ValueError as exc:
            raise _invalid(str(exc)) from None
        self._current = write
        self._received = 0
        return write

    def _append(self, write: Write, chunk: PutChunkLike) -> None:
        """Writes one chunk into place after checking it continues the value consistently."""
        if chunk.offset != self._received:
            raise _invalid(f"chunk out of order: offset {chunk.offset}, expected {self._received}")
        if chunk.total_size and chunk.total_size != write.size:
            raise _invalid(f"inconsistent total_size: {chunk.total_size} after {write.size}")
        end = self._received + len(chunk.data)
        if end > write.size:
            raise _invalid(f"chunks overrun the value: {end} bytes of {write.size}")
        write.write(self._received, chunk.data)
        self._received = end

    def _fail(self, namespace: str, key: bytes, exc: _Rejected) -> None:
        """Reports `key` failed, drops its value, and ignores the rest of its chunks."""
        self.errors.append(cachenode_pb2.KeyError(key=key, code=exc.code.name, message=str(exc)))
        self._skipping = (namespace, key)
        self.abort()

    def _collect(self) -> None:
        """Moves the batch's storage failures into `errors`, in the order they happened."""
        for key, exc in self._batch.failed:
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.error("put_many failed", exc_info=exc)
            self.errors.append(cachenode_pb2.KeyError(key=key, code=code.name, message=message))
        self._batch.failed.clear()
