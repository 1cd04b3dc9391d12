"""`gpu://cuda:N?capacity=8GiB` — KV blocks in accelerator memory, next to the inference engine.

One device tensor is allocated up front (a pool: no `cudaMalloc` per value, no allocator
fragmentation outside our control) and carved into extents by the same best-fit allocator
as the memory storage's arena. Bytes cross the host/device boundary through a few pinned
staging buffers: host memory that is page-locked can be DMA'd asynchronously, so each chunk
is copied on a dedicated CUDA stream and completion is awaited through an event, in a
worker thread, never on the event loop.

`gpu://cpu` runs exactly the same code with a CPU tensor (no stream, no pinning: both need
CUDA), which is how the storage is tested on machines without a GPU. PyTorch is the optional
`gpu` extra and is imported only when this storage is chosen.

A value being copied out is never freed under the reader: reads hold a reader count on the
extent, eviction skips held extents, and a delete or overwrite only hides a held extent
until its last reader finishes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.arena import ExtentAllocator
from kvmesh.services.cachenode.storage.base import Capabilities, Storage, StorageStats
from kvmesh.services.cachenode.storage.eviction import EvictionPolicy, policy_from_uri
from kvmesh.services.cachenode.storage.extents import Extent, ExtentIndex, deadline
from kvmesh.units import format_size
from kvmesh.uri import Uri, UriError

DEFAULT_CAPACITY = 1024**3
DEFAULT_STAGING = 8 * 1024**2
DEFAULT_STAGING_BUFFERS = 4
ALIGNMENT = 256  # CUDA's allocation granularity for coalesced access


def parse_device(uri: Uri) -> torch.device:
    """`gpu://cuda:N` → cuda:N, `gpu://cuda` → cuda:0, `gpu://cpu` → cpu."""
    kind = uri.host.lower()
    if kind == "cpu" and uri.port is None:
        return torch.device("cpu")
    if kind == "cuda":
        index = uri.port or 0
        if not torch.cuda.is_available():
            raise UriError(f"{uri.redacted()}: CUDA is not available on this machine (use gpu://cpu to test)")
        if index >= torch.cuda.device_count():
            raise UriError(f"{uri.redacted()}: no device cuda:{index} ({torch.cuda.device_count()} visible)")
        return torch.device("cuda", index)
    raise UriError(f"{uri.redacted()}: expected gpu://cuda:N or gpu://cpu")


class DeviceCopier:
    """Chunked host↔device copies through pinned staging buffers on one stream.

    Each copy runs in a worker thread with one or two staging buffers: chunk by chunk it
    fills (or drains) a buffer, queues the device copy on the stream and records an event;
    a buffer is reused only after its event completed, so with two buffers the host copy of
    one chunk overlaps the DMA of the other. On CPU there is no stream and no event, and the
    same copies simply run synchronously.
    """

    def __init__(self, device: torch.device, pool: torch.Tensor, staging_bytes: int, buffers: int) -> None:
        self.device = device
        self.pool = pool
        self.cuda = device.type == "cuda"
        self.staging_bytes = staging_bytes
        self.stream: Any = torch.cuda.Stream(device) if self.cuda else None
        self._free: asyncio.Queue[torch.Tensor] = asyncio.Queue()
        for _ in range(buffers):
            self._free.put_nowait(torch.empty(staging_bytes, dtype=torch.uint8, pin_memory=self.cuda))

    @contextlib.asynccontextmanager
    async def _staging(self) -> Any:
        """One staging buffer, plus a second when one is free: two let the host copy of one
        chunk overlap the DMA of the previous one."""
        buffers = [await self._free.get()]
        with contextlib.suppress(asyncio.QueueEmpty):
            buffers.append(self._free.get_nowait())
        try:
            yield buffers
        finally:
            for buffer in buffers:
                self._free.put_nowait(buffer)

    def _stream_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def _record(self) -> Any:
        """An event marking the work queued so far on the stream (None on CPU: already done)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event()
        event.record(self.stream)
        return event

    @staticmethod
    def _wait(event: Any) -> None:
        if event is not None:
            event.synchronize()

    def _chunks(self, size: int) -> Iterator[tuple[int, int]]:
        for pos in range(0, size, self.staging_bytes):
            yield pos, min(self.staging_bytes, size - pos)

    def _h2d(self, staging: list[torch.Tensor], offset: int, src: memoryview) -> None:
        hosts = [buffer.numpy() for buffer in staging]
        pending: list[Any] = [None] * len(staging)
        for k, (pos, n) in enumerate(self._chunks(len(src))):
            j = k % len(staging)
            self._wait(pending[j])  # the DMA that last read buffer j is done with it
            hosts[j][:n] = np.frombuffer(src[pos : pos + n], dtype=np.uint8)
            with self._stream_context():
                self.pool[offset + pos : offset + pos + n].copy_(staging[j][:n], non_blocking=self.cuda)
            pending[j] = self._record()
        for event in pending:
            self._wait(event)

    def _d2h(self, staging: list[torch.Tensor], offset: int, out: memoryview) -> None:
        hosts = [buffer.numpy() for buffer in staging]
        dst = np.frombuffer(out, dtype=np.uint8)
        previous: tuple[int, int, int, Any] | None = None

        def drain(j: int, pos: int, n: int, event: Any) -> None:
            self._wait(event)
            dst[pos : pos + n] = hosts[j][:n]

        for k, (pos, n) in enumerate(self._chunks(len(out))):
            j = k % len(staging)
            with self._stream_context():
                staging[j][:n].copy_(self.pool[offset + pos : offset + pos + n], non_blocking=self.cuda)
            event = self._record()
            if previous is not None:  # overlaps with the DMA just queued
                drain(*previous)
            previous = (j, pos, n, event)
        if previous is not None:
            drain(*previous)

    async def to_device(self, offset: int, src: memoryview) -> None:
        async with self._staging() as staging:
            await asyncio.to_thread(self._h2d, staging, offset, src)

    async def to_host(self, offset: int, out: memoryview) -> None:
        async with self._staging() as staging:
            await asyncio.to_thread(self._d2h, staging, offset, out)


class GpuStorage(Storage):
    """A preallocated device-memory pool with LRU or S3-FIFO eviction."""

    scheme = "gpu"
    capabilities = Capabilities(batch=False, zero_copy=False, persistent=False, device_memory=True)

    def __init__(self, device: torch.device, capacity: int, policy: EvictionPolicy, staging: int, buffers: int) -> None:
        super().__init__()
        self.device = device
        self._alloc = ExtentAllocator(capacity, ALIGNMENT)
        self.pool = torch.empty(self._alloc.capacity, dtype=torch.uint8, device=device)
        self.copier = DeviceCopier(device, self.pool, staging, buffers)
        self._extents = ExtentIndex(self._alloc, policy)
        self._closed = False

    @classmethod
    async def create(cls, uri: Uri) -> GpuStorage:
        device = parse_device(uri)
        capacity = uri.size_param("capacity", DEFAULT_CAPACITY)
        staging = uri.size_param("staging", DEFAULT_STAGING)
        buffers = uri.int_param("staging_buffers", DEFAULT_STAGING_BUFFERS)
        if capacity < ALIGNMENT:
            raise UriError(f"{uri.redacted()}: capacity must be at least {ALIGNMENT} bytes")
        if staging < 4096 or buffers < 1:
            raise UriError(f"{uri.redacted()}: staging must be at least 4KiB and staging_buffers at least 1")
        policy = policy_from_uri(uri, capacity)
        try:
            return cls(device, capacity, policy, staging, buffers)  # allocation is lazy on CPU, one cudaMalloc on GPU
        except torch.cuda.OutOfMemoryError as exc:
            raise UriError(f"{uri.redacted()}: cannot allocate {format_size(capacity)} on {device}: {exc}") from exc

    # -- introspection -------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"gpu({self.device},{self._extents.policy.name},{format_size(self.capacity_bytes)})"

    @property
    def capacity_bytes(self) -> int:
        return self._alloc.capacity

    @property
    def used_bytes(self) -> int:
        return self._extents.used

    def stats(self) -> StorageStats:
        return self._extents.stats(self.name)

    # -- internals -----------------------------------------------------------------------

    async def _evict_one(self) -> bool:
        chosen = self._extents.victim()
        if chosen is None:
            return False
        (namespace, key), slot = chosen
        if self._eviction_listener is not None:
            slot.pins += 1  # hidden below, but still ours until demoted
            try:
                self._extents.drop((namespace, key))
                value = await self._read(slot)
            finally:
                self._extents.unpin(slot)
            result = self._eviction_listener(namespace, key, value)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                await result
        else:
            self._extents.drop((namespace, key))
        self._extents.counters.evictions += 1
        return True

    async def _claim(self, size: int) -> int:
        """A fresh extent counted as used, evicting until one fits."""
        if size > self._alloc.capacity:
            raise ResourceExhausted(
                f"value of {format_size(size)} is larger than the device pool {format_size(self.capacity_bytes)}"
            )
        while True:
            offset = self._extents.claim(size)
            if offset is not None:
                return offset
            if not await self._evict_one():
                raise ResourceExhausted(
                    f"no room for {format_size(size)} on {self.device}: nothing evictable (all being read or written)"
                )

    async def _read(self, slot: Extent) -> bytes:
        out = bytearray(slot.size)
        if slot.size:
            await self.copier.to_host(slot.offset, memoryview(out))
        return bytes(out)

    # -- Storage --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        if self._closed:
            raise ResourceExhausted("storage is closed")
        src = memoryview(value).cast("B")
        size = len(src)
        offset = await self._claim(size)
        slot = Extent(offset, size, deadline(ttl_seconds))
        try:
            if size:
                await self.copier.to_device(offset, src)
        except BaseException:
            self._extents.retire(slot)
            raise
        # Published only now: readers of the old value were never blocked by this write.
        self._extents.publish((namespace, bytes(key)), slot)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        slot = self._extents.find((namespace, bytes(key)))
        if slot is None:
            return None
        slot.pins += 1
        try:
            return await self._read(slot)
        finally:
            self._extents.unpin(slot)

    async def delete(self, namespace: str, key: bytes) -> bool:
        return self._extents.drop((namespace, bytes(key))) is not None

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        return [self._extents.lookup((namespace, bytes(k))) is not None for k in keys]

    def device_view(self, namespace: str, key: bytes) -> torch.Tensor | None:
        """The stored bytes as a device tensor slice (no copy), for a storage in the same process.

        Valid until the value is replaced, deleted or evicted; callers copy it before awaiting.
        """
        slot = self._extents.lookup((namespace, bytes(key)))
        return None if slot is None else self.pool[slot.offset : slot.offset + slot.size]

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for ident in list(self._extents.entries):
            self._extents.drop(ident)
        if self.copier.cuda:
            await asyncio.to_thread(torch.cuda.synchronize, self.device)
