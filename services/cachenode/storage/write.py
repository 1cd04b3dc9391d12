"""The one way a value gets into a storage: `Storage.begin_write` → fill `view` → commit or abort.

Every writer (the unary Put of a zero-copy storage, BatchPut's chunk assembly, the zero-copy
data path's Allocate/Seal, and any further data plane) goes through a `Write`, so the
reserve/commit/abort protocol lives here and nowhere else:

- a zero-copy storage hands out a `ReservedWrite` over space it already reserved in its
  arena: bytes land in their final place, and commit only publishes them;
- any other storage hands out a `BufferedWrite` over a buffer of the final size, which
  commit hands to `put` (or, through a `WriteBatch`, to one `put_many` for many values);
- a writer whose bytes arrive over time from a client it does not trust (BatchPut's chunks)
  uses a `StagedWrite`: it keeps the chunks as they arrive and asks the storage for space
  (`begin_write`, which may evict) only once the last byte is in, so a client that announces
  a large value and stalls holds only what it sent, reserves nothing and evicts nothing.

A write is published whole or not at all; leaving a `with` block without committing aborts
it, and abort after commit (or twice) does nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Self

if TYPE_CHECKING:
    from kvmesh.services.cachenode.storage.base import Reservation, Storage, ZeroCopyStorage

# A WriteBatch stores its buffered values with one put_many once it holds this much.
BATCH_ITEMS = 64
BATCH_BYTES = 32 * 1024**2


class Write(ABC):
    """One value being written: fill `view` (or call `write`), then `commit` or `abort`."""

    __slots__ = ("_open", "key", "namespace", "size", "ttl_seconds")

    def __init__(self, namespace: str, key: bytes, size: int, ttl_seconds: int) -> None:
        if size < 0:
            raise ValueError("size must not be negative")
        self.namespace = namespace
        self.key = bytes(key)
        self.size = size
        self.ttl_seconds = ttl_seconds
        self._open = True

    @property
    def closed(self) -> bool:
        """True once committed or aborted."""
        return not self._open

    @property
    @abstractmethod
    def view(self) -> memoryview:
        """Writable memory of exactly `size` bytes where the value goes."""

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Copies `data` into the value at `offset` (a receive loop may fill `view` directly instead)."""
        self._check_open()
        end = offset + len(data)
        if offset < 0 or end > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset} is outside a value of {self.size} bytes")
        self.view[offset:end] = data

    async def commit(self) -> None:
        """Publishes the value whole: readers see it from now on, replacing any old one."""
        self._check_open()
        self._open = False
        await self._publish()

    def abort(self) -> None:
        """Drops the value and frees what it held; nothing happens after commit or a previous abort."""
        if self._open:
            self._open = False
            self._drop()

    def _check_open(self) -> None:
        if not self._open:
            raise ValueError(f"write of {self.key!r} is closed (committed or aborted already)")

    @abstractmethod
    async def _publish(self) -> None: ...

    @abstractmethod
    def _drop(self) -> None: ...

    @abstractmethod
    def _stage(self, batch: WriteBatch) -> None:
        """Commits (already closed) through `batch`: publishes now, or queues the value for its next flush."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()


class ReservedWrite(Write):
    """A write into space a zero-copy storage reserved: commit publishes in place, no copy."""

    __slots__ = ("_storage", "reservation")

    def __init__(self, storage: ZeroCopyStorage, reservation: Reservation) -> None:
        super().__init__(reservation.namespace, reservation.key, reservation.size, reservation.ttl_seconds)
        self._storage = storage
        self.reservation = reservation

    @property
    def view(self) -> memoryview:
        return self.reservation.view

    @property
    def offset(self) -> int:
        """Where the value lies in the storage's arena (what a data-path client addresses)."""
        return self.reservation.offset

    def publish(self) -> None:
        """`commit` without awaiting: publishing a reservation never waits (the data path seals this way)."""
        self._check_open()
        self._open = False
        self._storage.commit(self.reservation)

    async def _publish(self) -> None:
        self._storage.commit(self.reservation)

    def _drop(self) -> None:
        self._storage.abort(self.reservation)

    def _stage(self, batch: WriteBatch) -> None:
        self._storage.commit(self.reservation)
        batch.stored += 1


class BufferedWrite(Write):
    """A write into a private buffer that commit hands to the storage's `put`.

    A value that arrives whole in one `write` is kept by reference instead of copied, so a
    one-chunk value costs no copy here (the caller must not reuse that memory).
    """

    __slots__ = ("_buffer", "_storage", "_whole")

    def __init__(self, storage: Storage, namespace: str, key: bytes, size: int, ttl_seconds: int) -> None:
        super().__init__(namespace, key, size, ttl_seconds)
        self._storage = storage
        self._buffer: bytearray | None = None
        self._whole: bytes | memoryview | None = None

    @property
    def view(self) -> memoryview:
        if self._buffer is None:
            self._buffer = bytearray(self.size)
            if self._whole is not None:
                self._buffer[:] = self._whole
                self._whole = None
        return memoryview(self._buffer)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset == 0 and len(data) == self.size and self._buffer is None and self._open:
            self._whole = data
            return
        super().write(offset, data)

    def _value(self) -> bytes | memoryview:
        if self._whole is not None:
            return self._whole
        return self.view

    async def _publish(self) -> None:
        try:
            await self._storage.put(self.namespace, self.key, self._value(), self.ttl_seconds)
        finally:
            self._drop()

    def _drop(self) -> None:
        self._buffer = None
        self._whole = None

    def _stage(self, batch: WriteBatch) -> None:
        batch._queue(self.namespace, self.key, self._value(), self.ttl_seconds)
        self._drop()


class StagedWrite(Write):
    """A write that keeps its chunks as they arrive, in order, and stores them once complete.

    Nothing is reserved in the storage until `commit`: then `storage.begin_write` makes room
    (evicting if it must) for bytes that are all here. `received` is what the write holds.
    """

    __slots__ = ("_buffer", "_parts", "_storage", "received")

    def __init__(self, storage: Storage, namespace: str, key: bytes, size: int, ttl_seconds: int) -> None:
        super().__init__(namespace, key, size, ttl_seconds)
        self._storage = storage
        self._parts: list[bytes | memoryview] = []
        self._buffer: bytearray | None = None  # once `view` was asked for
        self.received = 0

    @property
    def view(self) -> memoryview:
        """The whole value in one buffer of the final size (allocates it: prefer `write`)."""
        if self._buffer is None:
            self._buffer = bytearray(self.size)
            offset = 0
            for part in self._parts:
                self._buffer[offset : offset + len(part)] = part
                offset += len(part)
            self._parts = [memoryview(self._buffer)]
            self.received = self.size  # a caller filling `view` may write anywhere
        return memoryview(self._buffer)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Appends `data`, which must continue the value where the last chunk ended."""
        if self._buffer is not None:
            super().write(offset, data)
            return
        self._check_open()
        if offset != self.received or offset + len(data) > self.size:
            raise ValueError(f"write of {len(data)} bytes at {offset}: expected the next bytes from {self.received}")
        if data:
            self._parts.append(data)
        self.received += len(data)

    def _target(self) -> Write:
        """The storage's own write of the value, filled with every byte received."""
        if self.received != self.size:
            raise ValueError(f"value incomplete: {self.received} of {self.size} bytes")
        parts, self._parts, self._buffer = self._parts, [], None
        target = self._storage.begin_write(self.namespace, self.key, self.size, self.ttl_seconds)
        try:
            if len(parts) == 1:
                target.write(0, parts[0])
            else:
                offset = 0
                for part in parts:
                    target.write(offset, part)
                    offset += len(part)
        except BaseException:
            target.abort()
            raise
        return target

    async def _publish(self) -> None:
        await self._target().commit()

    def _drop(self) -> None:
        self._parts = []
        self._buffer = None
        self.received = 0

    def _stage(self, batch: WriteBatch) -> None:
        target = self._target()
        target._check_open()
        target._open = False
        target._stage(batch)


class WriteBatch:
    """Commits many writes of one storage, storing buffered values together.

    Writes into reserved space publish at once; buffered values are queued and stored with
    one `put_many` per (namespace, ttl) when the batch is full or flushed, which is one
    round trip on storages with `capabilities.batch`. A failed `put_many` fails each of its
    keys: they are listed in `failed` with the exception, and `stored` counts the rest.
    """

    def __init__(self, storage: Storage, max_items: int = BATCH_ITEMS, max_bytes: int = BATCH_BYTES) -> None:
        self.storage = storage
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.stored = 0
        self.failed: list[tuple[bytes, Exception]] = []
        self._pending: list[tuple[str, bytes, bytes | memoryview, int]] = []
        self._pending_bytes = 0

    @property
    def pending(self) -> int:
        """Values committed to the batch but not yet stored."""
        return len(self._pending)

    @property
    def pending_bytes(self) -> int:
        """Bytes of the values committed to the batch but not yet stored."""
        return self._pending_bytes

    async def commit(self, write: Write) -> None:
        """Commits `write` through the batch (flushing when the batch is full)."""
        write._check_open()
        write._open = False
        write._stage(self)
        if len(self._pending) >= self.max_items or self._pending_bytes >= self.max_bytes:
            await self.flush()

    def _queue(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int) -> None:
        self._pending.append((namespace, key, value, ttl_seconds))
        self._pending_bytes += len(value)

    async def flush(self) -> None:
        """Stores every queued value; failures go to `failed`, never raised."""
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        groups: dict[tuple[str, int], list[tuple[bytes, bytes | memoryview]]] = {}
        for namespace, key, value, ttl in batch:
            groups.setdefault((namespace, ttl), []).append((key, value))
        for (namespace, ttl), items in groups.items():
            try:
                await self.storage.put_many(namespace, items, ttl)
                self.stored += len(items)
            except Exception as exc:
                self.failed.extend((key, exc) for key, _ in items)
