"""The `KVCache` gRPC service: validation, chunked streaming, and delegation to the storage.

Values larger than one message travel as chunks. BatchPut hands them to a ChunkAssembler
(chunk_assembly.py), which writes each value through the storage's one write API straight
into its final place and publishes it only when the last byte arrived: a value is stored
whole or not at all. BatchGet streams from a pinned view when the storage declares a
zero-copy surface, so the value is never copied whole before sending and never freed while
it is being sent.

The data-path RPCs (Attach/Allocate/Seal/Acquire/ReleaseViews) belong to the zero-copy and
RDMA transports; they are delegated to an optional `zerocopy` object.

Every call that touches blocks passes the node's `TenantGate` with the caller's principal
(`current_principal()`, set by the authenticating interceptor) before the storage sees it: reads
(Get, Exists, BatchGet) need the namespace's read grant, writes (Put, Delete, BatchPut) its
write grant, within the namespace's request rate and, for writes, its byte quota. BatchPut is
checked value by value: the first value in a namespace the caller may not write ends the stream
PERMISSION_DENIED (that value and the rest are not stored). Stats reports node-wide counters
only (no namespace, no key), so any authenticated caller may read it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import grpc

from kvmesh import wire
from kvmesh.runtime.errors import KvmeshError, Unavailable, guard, status_for
from kvmesh.security.identity import current_principal
from kvmesh.services.cachenode.chunk_assembly import ChunkAssembler, PutChunkLike
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.storage.base import Storage, StorageStats
from kvmesh.services.cachenode.tenants import TenantGate
from kvmesh.services.cachenode.write_budget import WriteBudget
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

if TYPE_CHECKING:
    from kvmesh.services.cachenode.zerocopy.api import ZeroCopyApi

log = logging.getLogger("kvmesh.cachenode")

def storage_stats_message(stats: StorageStats) -> cachenode_pb2.EngineStats:
    return cachenode_pb2.EngineStats(
        name=stats.name,
        tier=stats.tier,
        used_bytes=max(0, stats.used_bytes),
        capacity_bytes=max(0, stats.capacity_bytes),
        items=max(0, stats.items),
        hits=stats.hits,
        misses=stats.misses,
        evictions=stats.evictions,
    )


class KVCacheApi(cachenode_pb2_grpc.KVCacheServicer):
    """Serves one storage (possibly tiered). `storage` may be set after construction."""

    def __init__(
        self,
        storage: Storage | None,
        limits: Limits | None = None,
        zerocopy: ZeroCopyApi | None = None,
        writes: WriteBudget | None = None,
        tenants: TenantGate | None = None,
    ) -> None:
        self.storage = storage
        self.limits = limits or Limits()
        self.zerocopy = zerocopy
        self.writes = writes or WriteBudget()
        self.tenants = tenants or TenantGate()

    # -- validation ----------------------------------------------------------------------

    def _storage(self) -> Storage:
        if self.storage is None:
            raise Unavailable("cache node is starting: storage not ready")
        return self.storage

    # -- unary ---------------------------------------------------------------------------

    @guard
    async def Put(self, request: cachenode_pb2.PutRequest, context: grpc.aio.ServicerContext) -> Any:
        storage = self._storage()
        self.limits.check_namespace(request.namespace)
        self.limits.check_key(request.key)
        self.limits.check_size(len(request.value))
        await self.tenants.write_async(current_principal(), request.namespace, [(request.key, len(request.value))])
        await storage.put(request.namespace, request.key, request.value, request.ttl_seconds)
        return cachenode_pb2.PutResponse()

    @guard
    async def Get(self, request: cachenode_pb2.GetRequest, context: grpc.aio.ServicerContext) -> Any:
        storage = self._storage()
        self.limits.check_namespace(request.namespace)
        self.limits.check_key(request.key)
        self.tenants.read(current_principal(), request.namespace)
        value = await storage.get(request.namespace, request.key)
        if value is None:
            return cachenode_pb2.GetResponse(found=False)
        return cachenode_pb2.GetResponse(found=True, value=value)

    @guard
    async def Delete(self, request: cachenode_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> Any:
        storage = self._storage()
        self.limits.check_namespace(request.namespace)
        self.limits.check_key(request.key)
        self.tenants.delete(current_principal(), request.namespace)
        deleted = await storage.delete(request.namespace, request.key)
        self.tenants.deleted(request.namespace, request.key)
        return cachenode_pb2.DeleteResponse(deleted=deleted)

    @guard
    async def Exists(self, request: cachenode_pb2.ExistsRequest, context: grpc.aio.ServicerContext) -> Any:
        storage = self._storage()
        self.limits.check_namespace(request.namespace)
        self.limits.check_keys(request.keys)
        self.tenants.read(current_principal(), request.namespace)
        present = await storage.exists(request.namespace, list(request.keys)) if request.keys else []
        prefix = 0
        for hit in present:
            if not hit:
                break
            prefix += 1
        return cachenode_pb2.ExistsResponse(present=present, prefix_length=prefix)

    @guard
    async def Stats(self, request: cachenode_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:
        storage = self._storage()
        await storage.refresh_stats()
        return cachenode_pb2.StatsResponse(engines=[storage_stats_message(s) for s in storage.tier_stats()])

    # -- BatchPut ------------------------------------------------------------------------

    async def BatchPut(
        self,
        # wire.PutChunkView (kvcache_methods.py) or the generated PutChunk (the generated helper)
        request_iterator: AsyncIterator[PutChunkLike | wire.MalformedMessage],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        try:
            storage = self._storage()
        except KvmeshError as exc:
            await context.abort(exc.code, str(exc))
        try:
            hold = self.writes.open(context.peer())
        except KvmeshError as exc:
            await context.abort(exc.code, str(exc))
        principal = current_principal()
        counted: set[str] = set()  # namespaces this stream (one request) was counted against

        async def admit(namespace: str, key: bytes, size: int) -> None:
            await self.tenants.write_async(principal, namespace, [(key, size)], namespace not in counted)
            counted.add(namespace)

        assembler = ChunkAssembler(storage, self.limits, hold=hold, admit=admit)
        idle = self.writes.bounds.idle_timeout_s
        chunks = aiter(request_iterator)
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    assembler.abort()
                    await context.abort(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"no chunk for {idle:g} s (--write-idle-timeout-seconds): stream ended",
                    )
                if isinstance(chunk, wire.MalformedMessage):
                    assembler.abort()
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, chunk.error)
                    continue  # not reached: abort raises
                try:
                    await assembler.add(chunk)
                except KvmeshError as exc:  # not allowed in this namespace: the stream ends here
                    assembler.abort()
                    await context.abort(exc.code, str(exc))
            await assembler.finish()
        finally:
            assembler.close()
        return cachenode_pb2.BatchPutResponse(stored=assembler.stored, errors=assembler.errors)

    # -- BatchGet ------------------------------------------------------------------------

    def _chunks(self, index: int, key: bytes, value: memoryview) -> Iterator[bytes]:
        """Encoded GetChunk messages (see kvmesh.wire: one copy of the data per chunk)."""
        size = len(value)
        step = self.limits.chunk_bytes
        if size == 0:
            yield wire.encode_get_chunk(index, key, True)
            return
        for offset in range(0, size, step):
            yield wire.encode_get_chunk(index, key, True, size, offset, value[offset : offset + step])

    async def BatchGet(  # type: ignore[override]
        self, request: cachenode_pb2.BatchGetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes | cachenode_pb2.GetChunk]:  # bytes: pre-encoded GetChunk
        try:
            storage = self._storage()
            self.limits.check_namespace(request.namespace)
            self.limits.check_keys(request.keys)
            self.tenants.read(current_principal(), request.namespace)
        except KvmeshError as exc:
            await context.abort(exc.code, str(exc))
        namespace = request.namespace
        keys = list(request.keys)
        zero_copy = storage.zero_copy()
        if zero_copy is not None:
            for index, key in enumerate(keys):
                pinned = zero_copy.pin(namespace, key)
                if pinned is None:
                    yield cachenode_pb2.GetChunk(index=index, key=key, found=False)
                    if request.stop_at_first_miss:
                        return
                    continue
                try:
                    for message in self._chunks(index, key, pinned.view):
                        yield message
                finally:
                    pinned.release()
            return
        try:
            values = await storage.get_many(namespace, keys)
        except Exception as exc:
            code, text = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("get_many failed")
            await context.abort(code, text)
        for index, (key, value) in enumerate(zip(keys, values, strict=True)):
            if value is None:
                yield cachenode_pb2.GetChunk(index=index, key=key, found=False)
                if request.stop_at_first_miss:
                    return
                continue
            for message in self._chunks(index, key, memoryview(value)):
                yield message

    # -- data path (zero-copy / RDMA), implemented in services/cachenode/zerocopy/ --------

    async def _no_zerocopy(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "this cache node has no zero-copy/RDMA data path (its storage or configuration does not offer one)",
        )

    async def Attach(
        self, request: cachenode_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cachenode_pb2.AttachResponse]:
        if self.zerocopy is None:
            await self._no_zerocopy(context)
            return
        async for response in self.zerocopy.attach(request, context):
            yield response

    async def Allocate(self, request: cachenode_pb2.AllocateRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.zerocopy is None:
            await self._no_zerocopy(context)
        assert self.zerocopy is not None
        return await self.zerocopy.allocate(request, context)

    async def Seal(self, request: cachenode_pb2.SealRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.zerocopy is None:
            await self._no_zerocopy(context)
        assert self.zerocopy is not None
        return await self.zerocopy.seal(request, context)

    async def Acquire(self, request: cachenode_pb2.AcquireRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.zerocopy is None:
            await self._no_zerocopy(context)
        assert self.zerocopy is not None
        return await self.zerocopy.acquire(request, context)

    async def ReleaseViews(
        self, request: cachenode_pb2.ReleaseViewsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        if self.zerocopy is None:
            await self._no_zerocopy(context)
        assert self.zerocopy is not None
        return await self.zerocopy.release_views(request, context)
