"""`vineyard:///run/vineyard.sock?capacity=8GiB` — values as Vineyard blobs, shared in memory.

Each value is a sealed blob wrapped in a small named object (`kvmesh/<ns>/<hex key>`;
Vineyard does not name bare blobs). A blob is sealed before its name is published, so a
reader never sees a partial value; an overwrite publishes the new object first and drops
the old one after. A TTL is kept in the object's metadata and checked on
read. Vineyardd does not evict named objects, so this storage keeps the write
order of its own values and drops the oldest when the store (or `capacity`) is full.

The IPC client is blocking and not thread-safe: every call runs in one dedicated thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from kvmesh.runtime.errors import ResourceExhausted, Unavailable
from kvmesh.services.cachenode.storage.base import Capabilities, Counters, Storage, StorageStats
from kvmesh.units import format_size
from kvmesh.uri import Uri, UriError

T = TypeVar("T")
_TYPENAME = "kvmesh::Value"


def _import_vineyard() -> Any:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # vineyard imports pkg_resources, which warns
        import vineyard
    return vineyard


class VineyardStorage(Storage):
    """Vineyard over its IPC socket."""

    scheme = "vineyard"
    capabilities = Capabilities(batch=True, zero_copy=False, persistent=False, device_memory=False)

    def __init__(self, socket: str, capacity: int) -> None:
        super().__init__()
        self._socket = socket
        self._capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvmesh-vineyard")
        self._vineyard: Any = None
        self._errors: Any = None
        self._client: Any = None  # the vineyard.Client wrapper (seal() wants it)
        self._ipc: Any = None
        self._order: OrderedDict[str, int] = OrderedDict()  # name → size, oldest first
        self._used = 0
        self._counters = Counters()
        self._closed = False

    @classmethod
    async def create(cls, uri: Uri) -> VineyardStorage:
        if not uri.path:
            raise UriError(f"{uri.redacted()}: vineyard:// needs the IPC socket path, e.g. vineyard:///run/vineyard.sock")
        storage = cls(uri.path, uri.size_param("capacity", 0))
        try:
            await storage._call(storage._connect_sync)
        except Exception as exc:
            await storage.close()
            raise UriError(f"{uri.redacted()}: cannot connect to vineyardd: {exc}") from exc
        return storage

    def _connect_sync(self) -> None:
        self._vineyard = _import_vineyard()
        self._errors = self._vineyard._C  # the exception classes live in the extension module
        self._client = self._vineyard.connect(self._socket)
        self._ipc = self._client.ipc_client
        if not self._capacity:
            self._capacity = int(self._ipc.status.memory_limit)

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        if self._closed and fn != self._close_sync:
            raise Unavailable("vineyard storage is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @property
    def name(self) -> str:
        return f"vineyard({self._socket})"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def stats(self) -> StorageStats:
        return self._counters.stats(self.name, self._used, self._capacity, len(self._order))

    @staticmethod
    def _name(namespace: str, key: bytes) -> str:
        return f"kvmesh/{namespace.encode().hex()}/{key.hex()}"

    # -- blocking parts (the vineyard thread) --------------------------------------------

    def _lookup(self, name: str) -> Any:
        try:
            return self._ipc.get_name(name)
        except self._errors.ObjectNotExistsException:
            return None

    def _drop_sync(self, name: str) -> bool:
        object_id = self._lookup(name)
        if object_id is None:
            self._forget(name)
            return False
        with contextlib.suppress(self._errors.VineyardException):
            self._ipc.drop_name(name)
        with contextlib.suppress(self._errors.VineyardException):
            self._ipc.delete(object_id, deep=True)
        self._forget(name)
        return True

    def _forget(self, name: str) -> None:
        size = self._order.pop(name, None)
        if size is not None:
            self._used -= size

    def _evict_oldest(self, keep: str) -> bool:
        for name in self._order:
            if name != keep:
                self._drop_sync(name)
                self._counters.evictions += 1
                return True
        return False

    def _create_blob(self, name: str, size: int) -> Any:
        while True:
            if self._capacity and self._used + size > self._capacity and self._evict_oldest(name):
                continue
            try:
                return self._ipc.create_blob(size)
            except self._errors.NotEnoughMemoryException:
                if not self._evict_oldest(name):
                    raise ResourceExhausted(f"vineyard has no room for {format_size(size)}") from None

    def _put_one(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int) -> None:
        size = len(value)
        if self._capacity and size > self._capacity:
            raise ResourceExhausted(f"value of {format_size(size)} is larger than the vineyard capacity")
        name = self._name(namespace, key)
        builder = self._create_blob(name, max(size, 1))
        if size:
            builder.copy(0, bytes(value))
        blob = builder.seal(self._client)
        meta = self._vineyard.ObjectMeta()
        meta["typename"] = _TYPENAME
        meta["size_"] = size
        # As text: vineyard keeps float fields at single precision, too coarse for a timestamp.
        meta["expires_"] = repr(time.time() + ttl_seconds if ttl_seconds else 0.0)
        meta.add_member("buffer", blob)
        obj = self._ipc.create_metadata(meta)
        self._ipc.persist(obj.id)
        old = self._lookup(name)
        self._ipc.put_name(obj.id, name)  # the new value becomes visible whole
        if old is not None:
            with contextlib.suppress(self._errors.VineyardException):
                self._ipc.delete(old, deep=True)
        self._forget(name)
        self._order[name] = size
        self._used += size

    def _put_many_sync(self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl: int) -> None:
        for key, value in items:
            self._put_one(namespace, key, value, ttl)

    def _get_one(self, namespace: str, key: bytes) -> bytes | None:
        name = self._name(namespace, key)
        object_id = self._lookup(name)
        if object_id is None:
            return None
        try:
            meta = self._ipc.get_meta(object_id)
            if self._expired(meta):
                self._drop_sync(name)
                return None
            size = int(meta["size_"])
            return bytes(memoryview(meta.member("buffer"))[:size])
        except self._errors.ObjectNotExistsException:
            return None  # dropped between the two calls

    @staticmethod
    def _expired(meta: Any) -> bool:
        expires = float(meta["expires_"])
        return 0 < expires <= time.time()

    def _present(self, namespace: str, key: bytes) -> bool:
        name = self._name(namespace, key)
        object_id = self._lookup(name)
        if object_id is None:
            return False
        try:
            if self._expired(self._ipc.get_meta(object_id)):
                self._drop_sync(name)
                return False
        except self._errors.ObjectNotExistsException:
            return False
        return True

    def _get_many_sync(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        return [self._get_one(namespace, k) for k in keys]

    def _exists_sync(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return [self._present(namespace, k) for k in keys]

    def _close_sync(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = self._ipc = None

    # -- Storage --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        await self._call(self._put_many_sync, namespace, [(key, value)], ttl_seconds)

    async def put_many(
        self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl_seconds: int = 0
    ) -> None:
        await self._call(self._put_many_sync, namespace, list(items), ttl_seconds)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        return (await self.get_many(namespace, [key]))[0]

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        values = await self._call(self._get_many_sync, namespace, list(keys))
        self._counters.count_reads(values)
        return values

    async def delete(self, namespace: str, key: bytes) -> bool:
        return await self._call(self._drop_sync, self._name(namespace, key))

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return await self._call(self._exists_sync, namespace, list(keys))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._call(self._close_sync)
        self._executor.shutdown(wait=False)
