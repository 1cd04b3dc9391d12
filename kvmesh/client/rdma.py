"""The remote data path: values move by one-sided transfers (Mooncake), metadata by gRPC.

The client registers one staging buffer with its own transfer engine and attaches to the
node with transport RDMA. A put allocates regions over gRPC, copies the values into the
staging buffer and WRITEs them straight into the node's registered memory, then seals; a
get acquires views, READs the bytes into the staging buffer and releases the views. The
node's CPU never touches the bytes. Callers that already hold values in registered memory
avoid the staging copy entirely in production deployments; here the staging buffer keeps
the API the same as the gRPC and local paths.

Transfers are blocking calls into Mooncake and run in a worker thread; one staging buffer
means one transfer at a time per client (a lock), which is what the NIC serialises anyway.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from kvmesh.client.attachment import Attachment, attach, default_client_id
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

log = logging.getLogger("kvmesh.client.rdma")

P2P = "P2PHANDSHAKE"
DEFAULT_BUFFER_BYTES = 64 * 1024 * 1024


class RemotePathUnavailable(Exception):
    """The node offers no RDMA path, or the transfer engine cannot reach it."""


class TransferFailed(Exception):
    """A one-sided transfer returned an error code (the peer went away, or a bad address)."""


class RdmaDataPath(Attachment):
    """An attached RDMA session with one cache node."""

    unavailable = RemotePathUnavailable
    label = "rdma"
    task_name = "rdma-datapath-attach"
    logger = log
    _single_form = False

    def __init__(
        self,
        stub: cachenode_pb2_grpc.KVCacheStub,
        call: grpc.aio.UnaryStreamCall,
        attached: cachenode_pb2.AttachResponse,
        transfer: Any,
        buffer: np.ndarray,
        rpc_timeout: float,
        release_delay_s: float = 0.01,
    ) -> None:
        self.node_segment = attached.segment
        self.node_size = attached.segment_size
        self.base_address = attached.base_address
        self._transfer = transfer
        self._buffer = buffer
        self._address = int(buffer.ctypes.data)
        self._lock = asyncio.Lock()
        super().__init__(stub, call, attached, rpc_timeout, release_delay_s)

    @classmethod
    async def open(
        cls,
        stub: cachenode_pb2_grpc.KVCacheStub,
        *,
        local_hostname: str,
        protocol: str = "rdma",
        device: str = "",
        metadata: str = P2P,
        buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        client_id: str | None = None,
        rpc_timeout: float = 10.0,
    ) -> RdmaDataPath:
        """Starts a transfer engine on `local_hostname`, registers a staging buffer, attaches."""
        try:
            from mooncake.engine import TransferEngine
        except ImportError as exc:
            raise RemotePathUnavailable(f"the Mooncake transfer engine is not installed: {exc}") from exc
        transfer = TransferEngine()
        rc = await asyncio.to_thread(transfer.initialize, local_hostname, metadata, protocol, device)
        if rc != 0:
            raise RemotePathUnavailable(f"transfer engine failed to start (code {rc}, protocol {protocol})")
        buffer = np.zeros(buffer_bytes, dtype=np.uint8)  # touched now: registration pins real pages
        address = int(buffer.ctypes.data)
        rc = await asyncio.to_thread(transfer.register_memory, address, buffer_bytes)
        if rc != 0:
            raise RemotePathUnavailable(f"registering the staging buffer failed (code {rc})")
        segment = f"{local_hostname}:{transfer.get_rpc_port()}" if metadata == P2P else local_hostname
        request = cachenode_pb2.AttachRequest(
            client_id=client_id or default_client_id(),
            transport=cachenode_pb2.TRANSPORT_RDMA,
            client_segment=segment,
        )

        async def unregister() -> None:
            await asyncio.to_thread(transfer.unregister_memory, address)

        call, attached = await attach(stub, request, rpc_timeout, RemotePathUnavailable, "RDMA path", unregister)
        return cls(stub, call, attached, transfer, buffer, rpc_timeout)

    def _remote(self, region: cachenode_pb2.Region, size: int) -> int:
        if region.offset + size > self.node_size:
            raise TransferFailed(f"region ({region.offset}, {size}) lies outside the node's {self.node_size} bytes")
        return int(self.base_address + region.offset)

    def _batches(self, sizes: Sequence[int]) -> list[list[tuple[int, int, int]]]:
        """Cuts the items into (item, offset in item, length) pieces, grouped to fill the staging buffer."""
        capacity = len(self._buffer)
        batches: list[list[tuple[int, int, int]]] = []
        current: list[tuple[int, int, int]] = []
        used = 0
        for index, size in enumerate(sizes):
            pos = 0
            while pos < size:
                if used == capacity:
                    batches.append(current)
                    current, used = [], 0
                n = min(size - pos, capacity - used)
                current.append((index, pos, n))
                used += n
                pos += n
        if current:
            batches.append(current)
        return batches

    def _transfer_batch(self, write: bool, remote: list[int], lengths: list[int]) -> None:
        local, pos = [], 0
        for n in lengths:
            local.append(self._address + pos)
            pos += n
        op = self._transfer.batch_transfer_sync_write if write else self._transfer.batch_transfer_sync_read
        rc = op(self.node_segment, local, remote, lengths)
        if rc != 0:
            raise TransferFailed(f"{'write' if write else 'read'} of {pos} bytes to {self.node_segment} failed ({rc})")

    def _write_all(self, sources: list[memoryview], remotes: list[int]) -> None:
        for batch in self._batches([len(s) for s in sources]):
            pos = 0
            for index, offset, n in batch:
                self._buffer[pos : pos + n] = np.frombuffer(sources[index][offset : offset + n], dtype=np.uint8)
                pos += n
            self._transfer_batch(True, [remotes[i] + off for i, off, _ in batch], [n for _, _, n in batch])

    def _read_all(self, targets: list[memoryview], remotes: list[int]) -> None:
        for batch in self._batches([len(t) for t in targets]):
            self._transfer_batch(False, [remotes[i] + off for i, off, _ in batch], [n for _, _, n in batch])
            pos = 0
            for index, offset, n in batch:
                np.frombuffer(targets[index], dtype=np.uint8)[offset : offset + n] = self._buffer[pos : pos + n]
                pos += n

    # -- writes --------------------------------------------------------------------------

    async def _fill(self, allocations: Sequence[cachenode_pb2.Allocation], sources: Sequence[memoryview]) -> None:
        """WRITEs the values into the node's memory one-sided (they become visible at the Seal)."""
        remotes = [self._remote(a.region, len(s)) for a, s in zip(allocations, sources, strict=True)]
        async with self._lock:
            await asyncio.to_thread(self._write_all, list(sources), remotes)

    # -- reads ---------------------------------------------------------------------------

    async def _release(self, views: Sequence[cachenode_pb2.View]) -> None:
        if not self._detached:
            self._releases.add([v.view_id for v in views if v.found])

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """Reads values one-sided (the node holds them pinned until the read is done)."""
        views = await self._acquire_views(namespace, keys)
        try:
            found = [v for v in views if v.found]
            outs = [bytearray(v.region.size) for v in found]
            if found:
                remotes = [self._remote(v.region, v.region.size) for v in found]
                async with self._lock:
                    await asyncio.to_thread(self._read_all, [memoryview(o) for o in outs], remotes)
        finally:
            await self._release(views)
        values = iter(outs)
        return [bytes(next(values)) if v.found else None for v in views]

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        (value,) = await self.get_many(namespace, [key])
        return value

    async def get_into(self, namespace: str, key: bytes, out: memoryview) -> int | None:
        """Reads one value into a caller's buffer; returns its size, or None on a miss."""
        (view,) = await self._acquire_views(namespace, [key])
        if not view.found:
            return None
        try:
            size = view.region.size
            if size > len(out):
                raise ValueError(f"value of {size} bytes does not fit a buffer of {len(out)}")
            remote = self._remote(view.region, size)
            async with self._lock:
                await asyncio.to_thread(self._read_all, [out[:size]], [remote])
            return int(size)
        finally:
            await self._release([view])

    async def close(self) -> None:
        """Ends the session (the node releases what it still held) and unregisters the buffer."""
        await self._end()
        async with self._lock:
            if self._transfer is not None:
                await asyncio.to_thread(self._transfer.unregister_memory, self._address)
                self._transfer = None
