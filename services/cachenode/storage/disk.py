"""`disk://PATH?capacity=50GiB&sync=true` — persistent values in LMDB.

Why LMDB: a copy-on-write B+tree whose commits are atomic (a transaction is either wholly
in the file or not at all, with no recovery step), so a SIGKILL in the middle of writes can
lose only unacknowledged values and never leaves a torn one; it is small, mature, widely
deployed (OpenLDAP, Monero, Caffe), and reads are cheap memory-mapped lookups. A hand-made
append-only log would need its own recovery scan, compaction and checksums to reach the same
guarantees.

Each record carries a CRC32 of the value that is checked on every read, as a second line of
defence against media corruption (a mismatch is answered as a miss, never as a wrong value).
Capacity is enforced on value bytes (read inside each write transaction, so several processes
may share a store); eviction is FIFO by write order (kept in a second table, so it survives
restarts). `sync=true` (default) makes
each acknowledged write durable across power loss, not only across a process crash.

LMDB calls block, so they run in threads: writes in one dedicated thread (LMDB allows one
writer at a time anyway), reads in the default pool.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from kvmesh.runtime.errors import ResourceExhausted, Unavailable
from kvmesh.services.cachenode.storage.base import Capabilities, Counters, Storage, StorageStats
from kvmesh.units import format_size
from kvmesh.uri import Uri, UriError

T = TypeVar("T")
log = logging.getLogger("kvmesh.cachenode.disk")

DEFAULT_CAPACITY = 10 * 1024**3
_HEADER = struct.Struct("<IIQd")  # crc32, flags, write sequence, expiry (unix seconds, 0 = never)
_SEQ = struct.Struct(">Q")  # big-endian so the order table sorts by sequence
_META_USED = b"used"
_META_SEQ = b"seq"


def _ident(namespace: str, key: bytes) -> bytes:
    ns = namespace.encode()
    return struct.pack("<H", len(ns)) + ns + key


class DiskStorage(Storage):
    """LMDB-backed storage: whole-or-nothing writes, checksummed reads, FIFO eviction."""

    scheme = "disk"
    capabilities = Capabilities(batch=True, zero_copy=False, persistent=True, device_memory=False)

    def __init__(self, path: Path, capacity: int, sync: bool) -> None:
        super().__init__()
        self._path = path
        self._capacity = capacity
        path.mkdir(parents=True, exist_ok=True)
        # The map is sparse: reserve room for the values plus B-tree and page-rounding overhead.
        self._env = lmdb.open(
            str(path), map_size=capacity * 2 + 256 * 1024**2, max_dbs=4, sync=sync, metasync=sync,
            readahead=False, max_readers=256,
        )
        self._values = self._env.open_db(b"values")
        self._order = self._env.open_db(b"order")
        self._meta = self._env.open_db(b"meta")
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-disk-write")
        with self._env.begin(db=self._meta) as txn:
            used = txn.get(_META_USED)
            self._used = _SEQ.unpack(used)[0] if used else 0
        self._items = self._count_items()
        self._counters = Counters()
        self._corrupt = 0
        self._closed = False

    def _count_items(self) -> int:
        with self._env.begin() as txn:
            return int(txn.stat(self._values)["entries"])

    @classmethod
    async def create(cls, uri: Uri) -> DiskStorage:
        if not uri.path:
            raise UriError(f"{uri.redacted()}: disk:// needs a directory, e.g. disk:///var/lib/kvmesh")
        capacity = uri.size_param("capacity", DEFAULT_CAPACITY)
        if capacity <= 0:
            raise UriError(f"{uri.redacted()}: capacity must be positive")
        sync = uri.bool_param("sync", True)
        try:
            return await asyncio.to_thread(cls, Path(uri.path), capacity, sync)
        except (lmdb.Error, OSError) as exc:
            raise UriError(f"{uri.redacted()}: cannot open the store: {exc}") from exc

    @property
    def name(self) -> str:
        return f"disk({self._path},{format_size(self._capacity)})"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def stats(self) -> StorageStats:
        return self._counters.stats(self.name, self._used, self._capacity, self._items)

    async def _write(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise Unavailable("disk storage is closed")
        return await asyncio.get_running_loop().run_in_executor(self._writer, fn, *args)

    async def _read(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise Unavailable("disk storage is closed")
        return await asyncio.to_thread(fn, *args)

    # -- blocking parts (run in threads) ------------------------------------------------

    def _put_sync(self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl: int) -> None:
        for _, value in items:
            if len(value) > self._capacity:
                raise ResourceExhausted(
                    f"value of {format_size(len(value))} is larger than the disk capacity {format_size(self._capacity)}"
                )
        expires = time.time() + ttl if ttl else 0.0
        items_delta, evicted = 0, 0
        try:
            with self._env.begin(write=True) as txn:
                used = self._stored_used(txn)
                seq_raw = txn.get(_META_SEQ, db=self._meta)
                seq = _SEQ.unpack(seq_raw)[0] if seq_raw else 0
                written: set[bytes] = set()
                for key, value in items:
                    ident = _ident(namespace, key)
                    old = txn.get(ident, db=self._values)
                    if old is not None:
                        old_seq = _HEADER.unpack_from(old)[2]
                        txn.delete(_SEQ.pack(old_seq), db=self._order)
                        used -= len(old) - _HEADER.size
                        items_delta -= 1
                    seq += 1
                    record = _HEADER.pack(zlib.crc32(value), 0, seq, expires) + bytes(value)
                    txn.put(ident, record, db=self._values)
                    txn.put(_SEQ.pack(seq), ident, db=self._order)
                    used += len(value)
                    items_delta += 1
                    written.add(ident)
                # Evict the oldest writes until the new values fit (never one written just now).
                if used > self._capacity:
                    cursor = txn.cursor(db=self._order)
                    cursor.first()
                    while used > self._capacity:
                        victim = cursor.value()
                        if not cursor.key() or victim in written:
                            raise ResourceExhausted("batch is larger than the disk capacity")
                        old = txn.get(victim, db=self._values)
                        if old is not None:
                            used -= len(old) - _HEADER.size
                            txn.delete(victim, db=self._values)
                            items_delta -= 1
                            evicted += 1
                        if not cursor.delete():  # moves to the next record
                            break
                txn.put(_META_SEQ, _SEQ.pack(seq), db=self._meta)
                txn.put(_META_USED, _SEQ.pack(used), db=self._meta)
        except lmdb.MapFullError as exc:
            raise ResourceExhausted(f"disk store is full: {exc}") from exc
        self._used = used
        self._items += items_delta
        self._counters.evictions += evicted

    def _stored_used(self, txn: Any) -> int:
        """Used bytes as committed (read inside the write transaction, so it is never stale)."""
        raw = txn.get(_META_USED, db=self._meta)
        return int(_SEQ.unpack(raw)[0]) if raw else 0

    def _decode(self, record: bytes | None) -> bytes | None:
        if record is None:
            return None
        crc, _flags, _seq, expires = _HEADER.unpack_from(record)
        if expires and expires <= time.time():
            return None
        value = record[_HEADER.size :]
        if zlib.crc32(value) != crc:
            # Media corruption: a miss (the block is recomputed) is better than a wrong value.
            self._corrupt += 1
            log.error("disk value failed its checksum; answering a miss", extra={"path": str(self._path)})
            return None
        return value

    def _get_sync(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        with self._env.begin(db=self._values) as txn:
            return [self._decode(txn.get(_ident(namespace, k))) for k in keys]

    def _exists_sync(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        """Present, unexpired and intact: the checksum is checked as `get` checks it, so Exists
        never promises a value that Get would answer as a miss."""
        with self._env.begin(db=self._values, buffers=True) as txn:
            return [self._intact(txn.get(_ident(namespace, k))) for k in keys]

    def _intact(self, record: memoryview | None) -> bool:
        if record is None:
            return False
        crc, _flags, _seq, expires = _HEADER.unpack_from(record)
        if expires and expires <= time.time():
            return False
        if zlib.crc32(record[_HEADER.size :]) != crc:
            self._corrupt += 1
            log.error("disk value failed its checksum; answering absent", extra={"path": str(self._path)})
            return False
        return True

    def _delete_sync(self, namespace: str, key: bytes) -> bool:
        ident = _ident(namespace, key)
        with self._env.begin(write=True) as txn:
            old = txn.get(ident, db=self._values)
            if old is None:
                return False
            txn.delete(ident, db=self._values)
            txn.delete(_SEQ.pack(_HEADER.unpack_from(old)[2]), db=self._order)
            used = self._stored_used(txn) - (len(old) - _HEADER.size)
            txn.put(_META_USED, _SEQ.pack(used), db=self._meta)
        self._used = used
        self._items -= 1
        return True

    # -- Storage --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        await self._write(self._put_sync, namespace, [(key, value)], ttl_seconds)

    async def put_many(
        self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl_seconds: int = 0
    ) -> None:
        if items:
            await self._write(self._put_sync, namespace, list(items), ttl_seconds)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        return (await self.get_many(namespace, [key]))[0]

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        values: list[bytes | None] = await self._read(self._get_sync, namespace, list(keys))
        self._counters.count_reads(values)
        return values

    async def delete(self, namespace: str, key: bytes) -> bool:
        deleted: bool = await self._write(self._delete_sync, namespace, key)
        return deleted

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        present: list[bool] = await self._read(self._exists_sync, namespace, list(keys))
        return present

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._writer.shutdown, True)
        await asyncio.to_thread(self._env.close)
