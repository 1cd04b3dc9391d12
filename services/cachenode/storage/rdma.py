"""`rdma://HOST?capacity=...&protocol=rdma&device=mlx5_0` — values remote clients read and write
with one-sided transfers (Mooncake's transfer engine), while metadata stays on gRPC.

This is the memory storage (same extents, eviction, pins and reservations) over a
shared-memory arena whose whole region is registered with a Mooncake `TransferEngine`.
A remote client attaches with transport RDMA, asks the node over gRPC where a value goes
(Allocate) or lies (Acquire), and moves the bytes itself: RDMA WRITE into, or READ from,
`base_address + offset` of the node's segment; Seal and ReleaseViews close the exchange.
Because the region is also a named shm segment, clients on the node's own host keep the
zero-copy local path.

Mooncake finds peers through a metadata service; `metadata=P2PHANDSHAKE` (default) needs
none: a segment is named `host:rpc_port` and peers exchange descriptors directly.
`protocol=rdma` (production, with `device=` the NIC list) or `protocol=tcp` (tests, no NIC;
set `MC_TCP_BIND_ADDRESS`). Mooncake is the optional `rdma` extra, imported only here.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
from typing import Any

from kvmesh.services.cachenode.storage.base import Capabilities
from kvmesh.services.cachenode.storage.eviction import policy_from_uri
from kvmesh.services.cachenode.storage.memory import DEFAULT_CAPACITY, MemoryStorage
from kvmesh.services.cachenode.storage.shm_arena import ShmArena
from kvmesh.services.cachenode.zerocopy.exports import Export
from kvmesh.units import format_size
from kvmesh.uri import Uri, UriError
from kvmesh.v1 import cachenode_pb2

log = logging.getLogger("kvmesh.cachenode.rdma")

PROTOCOLS = ("rdma", "tcp")
P2P = "P2PHANDSHAKE"


def _address_of(view: memoryview) -> int:
    """The virtual address of a writable buffer (what a NIC registers)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class RdmaStorage(MemoryStorage):
    """The memory storage over a region registered for one-sided remote access."""

    scheme = "rdma"
    capabilities = Capabilities(batch=False, zero_copy=True, persistent=False, device_memory=False)

    def __init__(self, arena: ShmArena, policy: Any, transfer: Any, segment: str, protocol: str) -> None:
        super().__init__(arena, policy, "shm")
        self._shm = arena
        self._transfer = transfer
        self.segment = segment
        self.protocol = protocol
        self.base_address = _address_of(arena.buffer())
        self._registered = False

    @classmethod
    async def create(cls, uri: Uri) -> RdmaStorage:
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise UriError(f"rdma:// needs the Mooncake transfer engine (the `rdma` extra): {exc}") from exc
        if not uri.host:
            raise UriError(f"{uri.redacted()}: give the address peers reach this node at, e.g. rdma://10.0.0.5")
        capacity = uri.size_param("capacity", DEFAULT_CAPACITY)
        if capacity <= 0:
            raise UriError(f"{uri.redacted()}: capacity must be positive")
        protocol = uri.param("protocol", "rdma") or "rdma"
        if protocol not in PROTOCOLS:
            raise UriError(f"{uri.redacted()}: protocol must be one of {', '.join(PROTOCOLS)}")
        device = uri.param("device", "") or ""
        metadata = uri.param("metadata", P2P) or P2P
        policy = policy_from_uri(uri, capacity)
        hostname = uri.host if uri.port is None else f"{uri.host}:{uri.port}"
        transfer = TransferEngine()
        rc = await asyncio.to_thread(transfer.initialize, hostname, metadata, protocol, device)
        if rc != 0:
            raise UriError(
                f"{uri.redacted()}: Mooncake transfer engine failed to start (code {rc}; protocol {protocol}, "
                f"device {device or 'auto'})"
            )
        segment = f"{uri.host}:{transfer.get_rpc_port()}" if metadata == P2P else hostname
        arena = ShmArena.create(capacity, uri)
        storage = cls(arena, policy, transfer, segment, protocol)
        try:
            await storage._register()
        except BaseException:
            await storage.close()
            raise
        log.info(
            "registered %s at %s for %s (%s)", format_size(arena.size), hex(storage.base_address), segment, protocol
        )
        return storage

    async def _register(self) -> None:
        rc = await asyncio.to_thread(self._transfer.register_memory, self.base_address, self._shm.size)
        if rc != 0:
            raise UriError(f"registering {format_size(self._shm.size)} with the transfer engine failed (code {rc})")
        self._registered = True

    @property
    def name(self) -> str:
        return f"rdma({self.protocol},{self.segment},{format_size(self.capacity_bytes)})"

    def remote_export(self) -> Export:
        return Export(cachenode_pb2.TRANSPORT_RDMA, self.segment, self._shm.size, self.base_address)

    async def close(self) -> None:
        if self._registered:
            self._registered = False
            await asyncio.to_thread(self._transfer.unregister_memory, self.base_address)
        await super().close()
