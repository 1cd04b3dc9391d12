"""AIBrix KV cache (aibrix-kvcache 0.8) L2 backend `KVMESH`: AIBrix's L2 tier in the kvmesh mesh.

    import kvmesh.integrations.aibrix          # before AIBrix builds its cache manager
    AIBRIX_KV_CACHE_OL_L2_CACHE_BACKEND=KVMESH
    KVMESH_METADATA=HOST:PORT                  # or KVMESH_NODES=ID=HOST:PORT,...

AIBrix picks its L2 backend in `Connector.create`, a closed if/elif over names; importing this
module wraps that static method once so the name `KVMESH` builds `KvmeshConnector` and every other
name goes to AIBrix's own code. AIBrix hashes the blocks (16-byte rolling hashes) and checks the
tokens; the mesh key is a 16-byte digest of AIBrix's connection id (namespace, partition,
block-spec, key-builder and layout signatures) and its key, so engines of another shape never
read each other's blocks. A value is the block's bytes. The mesh client runs on its own thread
(`MeshLink`); AIBrix's coroutines await it. A mesh or node that is down gives `NOT_FOUND` on
exists/get and an error status on put: AIBrix recomputes, nothing raises.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any

from aibrix_kvcache.l2.connectors import Connector, ConnectorConfig, ConnectorFeature
from aibrix_kvcache.memory import MemoryRegion
from aibrix_kvcache.status import Status, StatusCodes

from kvmesh.integrations.link import MeshLink
from kvmesh.integrations.mesh import METADATA_ENV, NAMESPACE_ENV, NODES_ENV, open_client

log = logging.getLogger("kvmesh.integrations.aibrix")

BACKEND = "KVMESH"
TIMEOUT_ENV = "KVMESH_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 5.0


class KvmeshConnector(Connector):
    """An AIBrix L2 connector over a kvmesh `CacheClient` (batched: mget/mput)."""

    def __init__(self, conn_id: str, executor: Executor, *, metadata: str | None, nodes: str | None,
                 namespace: str, timeout_s: float) -> None:
        self.conn_id = conn_id
        self._executor = executor
        self._timeout_s = timeout_s
        self._prefix = conn_id.encode() + b"\x00"
        connect = functools.partial(open_client, metadata, nodes, namespace, sync_timeout_s=timeout_s)
        self._link = MeshLink(connect, name="kvmesh-aibrix")

    @classmethod
    def from_envs(cls, conn_id: str, executor: Executor, **kwargs: Any) -> KvmeshConnector:
        metadata, nodes = os.environ.get(METADATA_ENV) or None, os.environ.get(NODES_ENV) or None
        if not (metadata or nodes):
            raise ValueError(f"kvmesh AIBrix backend: set {METADATA_ENV} (or {NODES_ENV})")
        return cls(conn_id, executor, metadata=metadata, nodes=nodes,
                   namespace=os.environ.get(NAMESPACE_ENV, "aibrix"),
                   timeout_s=float(os.environ.get(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)))

    @property
    def name(self) -> str:
        return BACKEND

    @property
    def feature(self) -> ConnectorFeature:
        return ConnectorFeature(mput_mget=True)

    def _key(self, key: bytes) -> bytes:
        return hashlib.blake2b(self._prefix + bytes(key), digest_size=16).digest()

    def open(self) -> Status:
        self._link.start()
        if not self._link.wait_connected(self._timeout_s):
            log.warning("kvmesh AIBrix backend: mesh not reachable yet; misses until it is")
        return Status.ok()

    def close(self) -> Status:
        self._link.close()
        return Status.ok()

    async def exists(self, key: bytes) -> Status:
        mesh_key = self._key(key)
        present = await self._link.acall(lambda client: client.exists([mesh_key]), self._timeout_s)
        return Status.ok() if present and present[0] else Status(StatusCodes.NOT_FOUND)

    async def get(self, key: bytes, mr: MemoryRegion | Sequence[MemoryRegion]) -> Status:
        return (await self.mget([key], [mr]))[0]

    async def put(self, key: bytes, mr: MemoryRegion | Sequence[MemoryRegion]) -> Status:
        return (await self.mput([key], [mr]))[0]

    def get_batches(self, keys: Sequence[Any], mrs: Sequence[MemoryRegion | Sequence[MemoryRegion]],
                    batch_size: int) -> Sequence[Sequence[tuple[bytes, MemoryRegion | Sequence[MemoryRegion]]]]:
        pairs = list(zip(keys, mrs, strict=True))
        return [pairs[i : i + batch_size] for i in range(0, len(pairs), max(1, batch_size))]

    async def mget(self, keys: Sequence[bytes], mrs: Sequence[MemoryRegion | Sequence[MemoryRegion]]) -> list[Status]:
        mesh_keys = [self._key(k) for k in keys]
        values = await self._link.acall(lambda client: client.get_many(mesh_keys), self._timeout_s)
        # AIBrix counts the OK statuses of a batch as the blocks fetched from its start, so the
        # answer must be a prefix: after the first miss every later block is a miss too.
        statuses: list[Status] = []
        for i, mr in enumerate(mrs):
            value = values[i] if values is not None else None
            if value is None or not isinstance(mr, MemoryRegion) or len(value) != mr.length:
                break
            mr.fill(value)
            statuses.append(Status.ok())
        return statuses + [Status(StatusCodes.NOT_FOUND)] * (len(mrs) - len(statuses))

    async def mput(
        self, keys: Sequence[bytes], mrs: Sequence[MemoryRegion | Sequence[MemoryRegion]]
    ) -> list[Status] | Status:
        # A failure is one Status for the whole batch, never a list holding failures:
        # aibrix-kvcache 0.8.0's L2 cache raises AttributeError on such a list (it calls
        # `.result()` on a failed Status) instead of reporting the put as failed.
        if not all(isinstance(mr, MemoryRegion) for mr in mrs):
            return Status(StatusCodes.INVALID, "kvmesh: GDR memory regions are not supported")
        items = [(self._key(k), mr.tobytes()) for k, mr in zip(keys, mrs, strict=True)]  # type: ignore[union-attr]
        stored = await self._link.acall(lambda client: client.put_many(items), self._timeout_s)
        if stored == len(items):
            return [Status.ok()] * len(items)
        return Status(StatusCodes.ERROR, "kvmesh: not stored")

    async def delete(self, key: bytes) -> Status:
        mesh_key = self._key(key)
        await self._link.acall(lambda client: client.delete(mesh_key), self._timeout_s)
        return Status.ok()


def conn_id(config: ConnectorConfig) -> str:
    """AIBrix's connection id for a connector config (namespace, partition and signatures)."""
    ident = f"{config.namespace}_{config.partition_id}"
    signatures = f"{config.block_spec_signature}{config.key_builder_signature}{config.layout_signature}"
    return f"{ident}_{signatures}" if signatures else ident


def register() -> None:
    """Adds `KVMESH` to `Connector.create` (once; other names go to AIBrix's own factory)."""
    original = Connector.create
    if getattr(original, "_kvmesh", False):
        return

    def create(config: ConnectorConfig, **kwargs: Any) -> Any:
        if config.backend_name == BACKEND:
            return KvmeshConnector.from_envs(conn_id(config), config.executor, **kwargs)
        return original(config, **kwargs)

    create._kvmesh = True  # type: ignore[attr-defined]
    Connector.create = staticmethod(create)


register()
