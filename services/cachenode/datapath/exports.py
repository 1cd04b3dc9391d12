"""How a client reaches an engine's memory, per transport.

The shared-memory transport needs the engine's arena to be a named segment (`ShmArena`);
RDMA needs the engine to have registered its region with a transfer engine (`RdmaEngine`
implements `RemotelyAccessible`). Which transports a node offers follows from its engine,
checked here once instead of with `hasattr` at every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvmesh.v1 import cachenode_pb2
from services.cachenode.engines.base import Engine, ZeroCopyEngine
from services.cachenode.shm.arena import ShmArena

TRANSPORT_NAMES: dict[int, str] = {cachenode_pb2.TRANSPORT_SHM: "shm", cachenode_pb2.TRANSPORT_RDMA: "rdma"}


@dataclass(frozen=True)
class Export:
    """What a client needs to address the engine's region: offsets in Regions are relative to it."""

    transport: int  # cachenode_pb2.Transport
    segment: str  # shm: file name under /dev/shm; rdma: the transfer-engine segment name
    size: int
    base_address: int = 0  # rdma: address of offset 0 in the node's registered buffer


@runtime_checkable
class RemotelyAccessible(Protocol):
    """An engine whose region is registered for one-sided remote access."""

    def remote_export(self) -> Export:
        """The RDMA export of the engine's region."""
        ...


def exports_of(engine: Engine) -> dict[int, Export]:
    """The transports `engine` can serve, keyed by `cachenode_pb2.Transport`."""
    out: dict[int, Export] = {}
    if not isinstance(engine, ZeroCopyEngine):
        return out
    arena = engine.arena
    if isinstance(arena, ShmArena):
        out[cachenode_pb2.TRANSPORT_SHM] = Export(cachenode_pb2.TRANSPORT_SHM, arena.name, arena.size)
    if isinstance(engine, RemotelyAccessible):
        out[cachenode_pb2.TRANSPORT_RDMA] = engine.remote_export()
    return out
