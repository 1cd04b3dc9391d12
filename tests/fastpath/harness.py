"""An in-process cache node (the real service and servicer) for data-path tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from kvmesh.services.cachenode.service import CacheNodeService
from kvmesh.services.cachenode.storage.memory import MemoryStorage
from kvmesh.services.cachenode.storage.tiered import TieredStorage
from kvmesh.services.cachenode.zerocopy.api import ZeroCopyApi
from kvmesh.tools.testing.mesh import local_mesh
from kvmesh.v1 import cachenode_pb2_grpc


@dataclass
class Node:
    storage: MemoryStorage  # the storage clients map (L1 of a tier list)
    tiered: TieredStorage | None
    zerocopy: ZeroCopyApi | None  # None when the storage offers no data path (heap arena)
    address: str
    stub: cachenode_pb2_grpc.KVCacheStub

    def sessions(self) -> int:
        """Attached data-path sessions."""
        return len(self.zerocopy.table or ()) if self.zerocopy is not None else 0


@asynccontextmanager
async def zerocopy_node(
    storage_uri: str = "memory://?capacity=16MiB&arena=shm",
    allocation_timeout_ms: int = 30_000,
    namespaces: str = "",
    **more: object,
) -> AsyncIterator[Node]:
    """One standalone cache node from the shared mesh fixture (no metadata service); `more`
    are further cache-node settings."""
    settings = {"storage": storage_uri, "allocation_timeout_ms": allocation_timeout_ms, "namespaces": namespaces,
                **more}
    async with local_mesh(metadata=0, cachenodes=1, cachenode_settings=settings, grace_seconds=1) as mesh:
        service: CacheNodeService = mesh.of_role("cachenode")[0].service
        storage, zerocopy = service.storage, service.servicer.zerocopy
        tiered = storage if isinstance(storage, TieredStorage) else None
        if tiered is not None:
            storage = tiered.tiers[0]
        assert isinstance(storage, MemoryStorage)
        assert zerocopy is None or isinstance(zerocopy, ZeroCopyApi)
        address = mesh.addresses("cachenode")[0]
        yield Node(storage, tiered, zerocopy, address, mesh.kvcache())
