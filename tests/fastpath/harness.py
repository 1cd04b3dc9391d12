"""An in-process cache node (the real service and servicer) for data-path tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime
from kvmesh.v1 import cachenode_pb2_grpc
from services.cachenode.config import CacheNodeSettings
from services.cachenode.datapath.service import DataPath
from services.cachenode.engines.memory import MemoryEngine
from services.cachenode.engines.tiered import TieredEngine
from services.cachenode.service import CacheNodeService


@dataclass
class Node:
    engine: MemoryEngine  # the engine clients map (L1 of a tier list)
    tiered: TieredEngine | None
    datapath: DataPath | None  # None when the engine offers no data path (heap arena)
    address: str
    stub: cachenode_pb2_grpc.KVCacheStub

    def sessions(self) -> int:
        """Attached data-path sessions."""
        return len(self.datapath.table or ()) if self.datapath is not None else 0


@asynccontextmanager
async def datapath_node(
    engine_uri: str = "memory://?capacity=16MiB&arena=shm", allocation_timeout_ms: int = 30_000, namespaces: str = ""
) -> AsyncIterator[Node]:
    settings = CacheNodeSettings.model_validate(
        {
            "listen": "127.0.0.1:0",
            "grace_seconds": 1,
            "standalone": True,
            "engine": engine_uri,
            "allocation_timeout_ms": allocation_timeout_ms,
            "namespaces": namespaces,
        }
    )
    service = CacheNodeService(settings)
    runtime = ServerRuntime(service, settings)
    address = await runtime.start()
    channel = open_channel(address)
    try:
        engine, datapath = service.engine, service.servicer.datapath
        tiered = engine if isinstance(engine, TieredEngine) else None
        if tiered is not None:
            engine = tiered.tiers[0]
        assert isinstance(engine, MemoryEngine)
        assert datapath is None or isinstance(datapath, DataPath)
        yield Node(engine, tiered, datapath, address, cachenode_pb2_grpc.KVCacheStub(channel))
    finally:
        await channel.close()
        await runtime.stop()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Polls `condition` until it holds or `timeout` passes (the machine is loaded: be generous)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True
