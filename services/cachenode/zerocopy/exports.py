"""How a client reaches a storage's memory, per transport.

The shared-memory transport needs the storage's arena to be a named segment (`ShmArena`);
RDMA needs the storage to have registered its region with a transfer engine (`RdmaStorage`
implements `RemotelyAccessible`). Which transports a node offers follows from its storage,
checked here once instead of with `hasattr` at every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvmesh.services.cachenode.storage.base import ZeroCopyStorage
from kvmesh.services.cachenode.storage.shm_arena import ShmArena
from kvmesh.v1 import cachenode_pb2

TRANSPORT_NAMES: dict[int, str] = {cachenode_pb2.TRANSPORT_SHM: "shm", cachenode_pb2.TRANSPORT_RDMA: "rdma"}


@dataclass(frozen=True)
class Export:
    """What a client needs to address the storage's region: offsets in Regions are relative to it."""

    transport: int  # cachenode_pb2.Transport
    segment: str  # shm: file name under /dev/shm; rdma: the transfer-storage segment name
    size: int
    base_address: int = 0  # rdma: address of offset 0 in the node's registered buffer


@runtime_checkable
class RemotelyAccessible(Protocol):
    """A storage whose region is registered for one-sided remote access."""

    def remote_export(self) -> Export:
        """The RDMA export of the storage's region."""
        ...


def exports_of(storage: ZeroCopyStorage) -> dict[int, Export]:
    """The transports `storage` can serve, keyed by `cachenode_pb2.Transport`."""
    out: dict[int, Export] = {}
    arena = storage.arena
    if isinstance(arena, ShmArena):
        out[cachenode_pb2.TRANSPORT_SHM] = Export(cachenode_pb2.TRANSPORT_SHM, arena.name, arena.size)
    if isinstance(storage, RemotelyAccessible):
        out[cachenode_pb2.TRANSPORT_RDMA] = storage.remote_export()
    return out
