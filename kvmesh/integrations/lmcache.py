"""LMCache remote storage plugin: LMCache's remote tier stored in the kvmesh mesh.

    remote_url: "plugin://kvmesh"
    remote_storage_plugins: ["kvmesh"]
    extra_config:
      remote_storage_plugin.kvmesh.module_path: kvmesh.integrations.lmcache
      remote_storage_plugin.kvmesh.class_name: KvmeshConnector
      kvmesh.metadata: "HOST:PORT"        # or the KVMESH_METADATA environment variable

LMCache hashes the chunks (its `CacheEngineKey`); the mesh key is a 16-byte digest of the key's
string. A value is LMCache's own `RemoteMetadata` (shapes, dtypes, format, length) followed by the
chunk's bytes; a value whose size disagrees with its metadata is a miss. The mesh answers on
LMCache's event loop through the async `CacheClient`; a mesh that is down gives misses and failed
puts, never exceptions. The mesh has no listing call, so `list()` returns the keys this connector
stored that are still present (a bounded record of the most recent `kvmesh.list_limit`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Any

from lmcache.utils import CacheEngineKey
from lmcache.v1.memory_management import MemoryObj
from lmcache.v1.protocol import RemoteMetadata
from lmcache.v1.storage_backend.connector.base_connector import RemoteConnector

from kvmesh.client.cache import CacheClient
from kvmesh.integrations.mesh import METADATA_ENV, NAMESPACE_ENV, NODES_ENV, open_client

log = logging.getLogger("kvmesh.integrations.lmcache")

DEFAULT_LIST_LIMIT = 100_000
RECONNECT_PAUSE_S = 1.0


def mesh_key(key: CacheEngineKey) -> bytes:
    return hashlib.blake2b(key.to_string().encode(), digest_size=16).digest()


class KvmeshConnector(RemoteConnector):
    """`RemoteConnector` over a kvmesh `CacheClient` living on LMCache's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, local_cpu_backend: Any, config: Any,
                 *args: Any, **kwargs: Any) -> None:
        super().__init__(local_cpu_backend.config, local_cpu_backend.metadata)
        extra = dict(getattr(config, "extra_config", None) or {})
        self.loop = loop
        self.local_cpu_backend = local_cpu_backend
        self._metadata = extra.get("kvmesh.metadata") or os.environ.get(METADATA_ENV)
        self._nodes = extra.get("kvmesh.nodes") or os.environ.get(NODES_ENV)
        self._namespace = str(extra.get("kvmesh.namespace") or os.environ.get(NAMESPACE_ENV, "lmcache"))
        self._sync_timeout_s = float(extra.get("kvmesh.timeout_s", 10.0))
        self._list_limit = int(extra.get("kvmesh.list_limit", DEFAULT_LIST_LIMIT))
        self._stored: OrderedDict[bytes, str] = OrderedDict()
        self._stored_lock = threading.Lock()
        self._client: CacheClient | None = None
        self._connecting: asyncio.Lock | None = None
        self._next_attempt = 0.0
        if not (self._metadata or self._nodes):
            raise ValueError(f"kvmesh LMCache plugin: set extra_config kvmesh.metadata or {METADATA_ENV}")

    # -- the client, connected lazily on LMCache's loop, again after a failure -------------------

    async def _mesh(self) -> CacheClient | None:
        if self._client is not None:
            return self._client
        if time.monotonic() < self._next_attempt:
            return None
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._client is None and time.monotonic() >= self._next_attempt:
                try:
                    self._client = await open_client(self._metadata, self._nodes, self._namespace,
                                                     sync_timeout_s=self._sync_timeout_s)
                except Exception as exc:
                    self._next_attempt = time.monotonic() + RECONNECT_PAUSE_S
                    log.warning("kvmesh LMCache plugin: mesh not reachable (%s)", exc)
        return self._client

    # -- values ----------------------------------------------------------------------------

    def _encode(self, memory_obj: MemoryObj) -> bytes:
        data = memory_obj.byte_array
        meta = RemoteMetadata(len(data), memory_obj.get_shapes(), memory_obj.get_dtypes(),
                              memory_obj.get_memory_format())
        return b"".join((meta.serialize(), data))

    def _decode(self, value: bytes) -> MemoryObj | None:
        head = self.remote_metadata_bytes
        if len(value) < head:
            return None
        meta = RemoteMetadata.deserialize(value[:head])
        if meta.length != len(value) - head:
            return None
        memory_obj = self.local_cpu_backend.allocate(meta.shapes, meta.dtypes, meta.fmt)
        if memory_obj is None:
            log.debug("kvmesh LMCache plugin: no memory for a %d-byte chunk", meta.length)
            return None
        buf = memory_obj.byte_array
        if len(buf) < meta.length:
            memory_obj.ref_count_down()
            return None
        memoryview(buf).cast("B")[: meta.length] = memoryview(value)[head:]
        return self.reshape_partial_chunk(memory_obj, meta.length) if meta.length != len(buf) else memory_obj

    def _remember(self, keys: list[CacheEngineKey]) -> None:
        with self._stored_lock:
            for key in keys:
                self._stored[mesh_key(key)] = key.to_string()
                self._stored.move_to_end(mesh_key(key))
            while len(self._stored) > self._list_limit:
                self._stored.popitem(last=False)

    # -- RemoteConnector ---------------------------------------------------------------------

    async def exists(self, key: CacheEngineKey) -> bool:
        client = await self._mesh()
        return bool(client is not None and (await client.exists([mesh_key(key)]))[0])

    def exists_sync(self, key: CacheEngineKey) -> bool:
        if _running_loop() is self.loop:
            raise RuntimeError("exists_sync called on LMCache's own event loop: use exists")
        return asyncio.run_coroutine_threadsafe(self.exists(key), self.loop).result(self._sync_timeout_s)

    async def get(self, key: CacheEngineKey) -> MemoryObj | None:
        return (await self.batched_get([key]))[0]

    async def put(self, key: CacheEngineKey, memory_obj: MemoryObj) -> None:
        await self.batched_put([key], [memory_obj])

    def support_batched_get(self) -> bool:
        return True

    async def batched_get(self, keys: list[CacheEngineKey]) -> list[MemoryObj | None]:
        client = await self._mesh()
        if client is None:
            return [None] * len(keys)
        values = await client.get_many([mesh_key(k) for k in keys])
        return [None if v is None else self._decode(v) for v in values]

    def support_batched_put(self) -> bool:
        return True

    async def batched_put(self, keys: list[CacheEngineKey], memory_objs: list[MemoryObj]) -> None:
        client = await self._mesh()
        if client is None:
            raise ConnectionError("kvmesh mesh not reachable")
        items = [(mesh_key(k), self._encode(m)) for k, m in zip(keys, memory_objs, strict=True)]
        stored = await client.put_many(items)
        self._remember(list(keys))
        if stored < len(items):
            raise ConnectionError(f"kvmesh stored {stored} of {len(items)} chunks")

    async def batched_async_contains(self, lookup_id: str, keys: list[CacheEngineKey], pin: bool = False) -> int:
        client = await self._mesh()
        return 0 if client is None else await client.exists_prefix([mesh_key(k) for k in keys])

    def support_batched_contains(self) -> bool:
        return True

    def batched_contains(self, keys: list[CacheEngineKey]) -> int:
        async def prefix() -> int:
            client = await self._mesh()
            return 0 if client is None else await client.exists_prefix([mesh_key(k) for k in keys])

        return asyncio.run_coroutine_threadsafe(prefix(), self.loop).result(self._sync_timeout_s)

    def remove_sync(self, key: CacheEngineKey) -> bool:
        async def remove() -> bool:
            client = await self._mesh()
            return client is not None and await client.delete(mesh_key(key))

        return asyncio.run_coroutine_threadsafe(remove(), self.loop).result(self._sync_timeout_s)

    def support_ping(self) -> bool:
        return True

    async def ping(self) -> int:
        client = await self._mesh()
        return 0 if client is not None and client.nodes else 1

    async def list(self) -> list[str]:
        client = await self._mesh()
        with self._stored_lock:
            known = list(self._stored.items())
        if client is None or not known:
            return []
        present = await client.exists([k for k, _ in known])
        return [name for (_, name), hit in zip(known, present, strict=True) if hit]

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None
