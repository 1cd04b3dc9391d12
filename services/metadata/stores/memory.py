"""`memory://`: the embedded backend, for one machine and for tests.

Everything lives in this process: entries in a dict, the change log in a bounded deque,
leases with deadlines checked by a sweeper task (LEAVE within ttl + sweep interval).
Lease ids are random (63 bits), so they cannot be guessed. Revisions start at the wall clock
in microseconds, so after a restart they are larger
than any revision of the previous incarnation: a watcher resuming from an old revision
is told it is not retained and gets a fresh SNAPSHOT instead of a replay of another history.

URI parameters: `retain` (events kept for resume, default 10000), `retain_bytes` (bytes of
keys and values those events may hold, default 64MiB: old values are never kept beyond it),
`sweep_ms` (default 100). A watcher's queue is bounded the same way (events and bytes): one
that falls further behind is cut off and resumes (or gets a SNAPSHOT).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import time
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from kvmesh.runtime.errors import Unavailable
from kvmesh.services.metadata.stores.base import Change, Compacted, Entry, LeaseNotFound, Store, Sweeper, new_lease_id
from kvmesh.uri import Uri, UriError


@dataclass
class _Lease:
    ttl: int
    deadline: float
    keys: set[str] = field(default_factory=set)


CHANGE_OVERHEAD = 128  # bytes a Change costs besides its key and value


def change_bytes(change: Change) -> int:
    return len(change.key) + len(change.value) + CHANGE_OVERHEAD


class _Subscriber:
    """One watcher's queue; a watcher that falls too far behind is cut off (it resumes)."""

    def __init__(self, prefix: str, limit: int, limit_bytes: int) -> None:
        self.prefix = prefix
        self.queue: asyncio.Queue[Change | None] = asyncio.Queue(maxsize=limit)
        self.limit_bytes = limit_bytes
        self.queued_bytes = 0
        self.overflowed = False

    def taken(self, change: Change) -> None:
        """The watcher took `change` off the queue."""
        self.queued_bytes -= change_bytes(change)

    def offer(self, change: Change) -> None:
        if self.overflowed or not change.key.startswith(self.prefix):
            return
        try:
            if self.queued_bytes + change_bytes(change) > self.limit_bytes:
                raise asyncio.QueueFull
            self.queue.put_nowait(change)
            self.queued_bytes += change_bytes(change)
        except asyncio.QueueFull:
            self.overflowed = True
            with contextlib.suppress(asyncio.QueueEmpty):
                self.queue.get_nowait()
            self.queue.put_nowait(None)


DEFAULT_RETAIN_BYTES = 64 * 1024**2


class MemoryStore(Store):
    """All state in this process; every operation is a few dict updates on the event loop."""

    def __init__(self, retain: int = 10_000, sweep_s: float = 0.1, retain_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        self._retain = retain
        self._retain_bytes = retain_bytes
        self._log_bytes = 0
        self._sweep_s = sweep_s
        self._entries: dict[str, Entry] = {}
        self._sorted_keys: list[str] = []
        self._leases: dict[int, _Lease] = {}
        self._revision = time.time_ns() // 1000
        self._compacted = self._revision  # events up to here are gone (or never existed)
        self._log: deque[Change] = deque()
        self._subscribers: set[_Subscriber] = set()
        self._sweeper = Sweeper(self._sweep, self._sweep_s, "metadata-memory-sweeper")

    @classmethod
    async def create(cls, uri: Uri) -> MemoryStore:
        if uri.hosts and uri.host:
            raise UriError(f"{uri.redacted()}: memory:// takes no host")
        retain = uri.int_param("retain", 10_000)
        retain_bytes = uri.size_param("retain_bytes", DEFAULT_RETAIN_BYTES)
        sweep_ms = uri.int_param("sweep_ms", 100)
        if retain < 1 or retain_bytes < 1 or not 1 <= sweep_ms <= 10_000:
            raise UriError(f"{uri.redacted()}: retain and retain_bytes must be >= 1 and sweep_ms in 1..10000")
        return cls(retain=retain, sweep_s=sweep_ms / 1000.0, retain_bytes=retain_bytes)

    async def start(self) -> None:
        self._sweeper.start()

    async def close(self) -> None:
        await self._sweeper.stop()
        for sub in list(self._subscribers):
            sub.overflowed = True
            with contextlib.suppress(asyncio.QueueFull):
                sub.queue.put_nowait(None)

    async def ping(self) -> None:
        return None

    # -- leases --------------------------------------------------------------------------
    def _now(self) -> float:
        return time.monotonic()

    def _live_lease(self, lease_id: int) -> _Lease:
        lease = self._leases.get(lease_id)
        if lease is None or lease.deadline <= self._now():
            raise LeaseNotFound(lease_id)
        return lease

    async def grant(self, ttl_seconds: int) -> tuple[int, int]:
        lease_id = new_lease_id()
        while lease_id in self._leases:  # 1 in 2^63 per live lease; never hand out a live id twice
            lease_id = new_lease_id()
        self._leases[lease_id] = _Lease(ttl_seconds, self._now() + ttl_seconds)
        return lease_id, ttl_seconds

    async def refresh(self, lease_id: int) -> int:
        lease = self._live_lease(lease_id)
        lease.deadline = self._now() + lease.ttl
        return lease.ttl

    async def revoke(self, lease_id: int) -> int:
        lease = self._leases.get(lease_id)
        if lease is None:
            raise LeaseNotFound(lease_id)
        if lease.deadline <= self._now():  # expired, not swept yet: sweep it, still an error
            self._expire(lease_id)
            raise LeaseNotFound(lease_id)
        return self._expire(lease_id)

    def _expire(self, lease_id: int) -> int:
        lease = self._leases.pop(lease_id)
        if not lease.keys:
            return self._revision
        self._revision += 1
        for key in sorted(lease.keys):
            self._remove(key)
        return self._revision

    async def _sweep(self) -> None:
        now = self._now()
        for lease_id in [i for i, lease in self._leases.items() if lease.deadline <= now]:
            self._expire(lease_id)

    # -- keys ----------------------------------------------------------------------------
    def _emit(self, change: Change) -> None:
        self._log.append(change)
        self._log_bytes += change_bytes(change)
        while len(self._log) > self._retain or self._log_bytes > self._retain_bytes:
            dropped = self._log.popleft()
            self._log_bytes -= change_bytes(dropped)
            self._compacted = dropped.revision
        # A revision may carry several changes (a revoke): keep them all or none.
        while self._log and self._log[0].revision <= self._compacted:
            self._log_bytes -= change_bytes(self._log.popleft())
        for sub in self._subscribers:
            sub.offer(change)

    def _remove(self, key: str) -> None:
        """Deletes `key` at the current revision (the caller bumped it)."""
        old = self._entries.pop(key)
        index = bisect.bisect_left(self._sorted_keys, key)
        del self._sorted_keys[index]
        if old.lease_id and old.lease_id in self._leases:
            self._leases[old.lease_id].keys.discard(key)
        self._emit(Change("delete", key, old.value, self._revision, lease_id=old.lease_id))

    def _write(self, key: str, value: bytes, lease_id: int) -> int:
        lease = self._live_lease(lease_id) if lease_id else None
        old = self._entries.get(key)
        self._revision += 1
        if old is None:
            bisect.insort(self._sorted_keys, key)
        elif old.lease_id and old.lease_id != lease_id and old.lease_id in self._leases:
            self._leases[old.lease_id].keys.discard(key)
        if lease is not None:
            lease.keys.add(key)
        created = old is None
        create_revision = self._revision if old is None else old.create_revision
        self._entries[key] = Entry(key, value, self._revision, create_revision, lease_id)
        self._emit(Change("put", key, value, self._revision, created=created, lease_id=lease_id))
        return self._revision

    async def get(self, key: str) -> Entry | None:
        return self._entries.get(key)

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        return self._write(key, value, lease_id)

    async def delete(self, key: str) -> tuple[bool, int]:
        if key not in self._entries:
            return False, self._revision
        self._revision += 1
        self._remove(key)
        return True, self._revision

    async def range(self, prefix: str, limit: int = 0) -> tuple[list[Entry], int]:
        start = bisect.bisect_left(self._sorted_keys, prefix)
        out: list[Entry] = []
        for key in itertools.islice(self._sorted_keys, start, None):
            if not key.startswith(prefix) or (limit and len(out) >= limit):
                break
            out.append(self._entries[key])
        return out, self._revision

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease_id: int = 0
    ) -> tuple[bool, int, Entry | None]:
        current = self._entries.get(key)
        if (current.mod_revision if current else 0) != expected_mod_revision:
            return False, self._revision, current
        revision = self._write(key, value, lease_id)
        return True, revision, self._entries[key]

    async def revision(self) -> int:
        return self._revision

    async def watch(self, prefix: str, after_revision: int) -> AsyncGenerator[Change, None]:
        if not self._compacted <= after_revision <= self._revision:
            raise Compacted(f"revision {after_revision} is not retained")
        sub = _Subscriber(prefix, limit=max(1024, self._retain), limit_bytes=self._retain_bytes)
        backlog = [c for c in self._log if c.revision > after_revision and c.key.startswith(prefix)]
        self._subscribers.add(sub)
        try:
            for change in backlog:
                yield change
            while True:
                item = await sub.queue.get()
                if item is None:
                    raise Unavailable("watch fell behind or the store closed; resume from the last revision")
                sub.taken(item)
                yield item
        finally:
            self._subscribers.discard(sub)
