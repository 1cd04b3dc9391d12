"""The `KVCache` gRPC service: validation, chunked streaming, and delegation to the engine.

Values larger than one message travel as chunks. BatchPut writes chunks of a key straight
into a reservation of the final size (zero-copy engines) or one preallocated buffer, and
publishes the value only when the last byte arrived: a value is stored whole or not at all.
BatchGet streams from a pinned view, so the value is never copied whole before sending and
never freed while it is being sent.

The data-path RPCs (Attach/Allocate/Seal/Acquire/ReleaseViews) belong to the zero-copy and
RDMA transports; they are delegated to an optional `datapath` object.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from kvmesh.client import wire
from kvmesh.runtime.errors import (
    InvalidArgument,
    KvmeshError,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
    guard,
    status_for,
)
from kvmesh.units import format_size
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc
from services.cachenode.engines.base import Engine, EngineStats, Reservation, ZeroCopyEngine

log = logging.getLogger("kvmesh.cachenode")

# BatchPut chunks arrive as wire.PutChunkView (registered through handlers.py) or as
# generated PutChunk messages (when the servicer is registered with the generated helper).
PutChunkLike = wire.PutChunkView | cachenode_pb2.PutChunk

MAX_NAMESPACE_BYTES = 256
PUT_FLUSH_ITEMS = 64  # buffered values written with one put_many (pipelined on batch engines)
PUT_FLUSH_BYTES = 32 * 1024**2


@dataclass(frozen=True)
class Limits:
    """What a client may send."""

    max_key_bytes: int = 1024
    max_value_bytes: int = 256 * 1024**2
    chunk_bytes: int = 4 * 1024**2
    namespaces: frozenset[str] | None = None  # None: every namespace


class DataPath(Protocol):
    """The zero-copy / RDMA transports (services/cachenode/datapath/)."""

    def attach(
        self, request: cachenode_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cachenode_pb2.AttachResponse]: ...

    async def allocate(
        self, request: cachenode_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.AllocateResponse: ...

    async def seal(
        self, request: cachenode_pb2.SealRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.SealResponse: ...

    async def acquire(
        self, request: cachenode_pb2.AcquireRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.AcquireResponse: ...

    async def release_views(
        self, request: cachenode_pb2.ReleaseViewsRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.ReleaseViewsResponse: ...


def engine_stats_message(stats: EngineStats) -> cachenode_pb2.EngineStats:
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


class _KeyFailed(KvmeshError):
    """One key of a batch failed; the rest of the batch goes on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class _Incoming:
    """A value arriving in chunks: its destination and how much has arrived."""

    __slots__ = ("buffer", "key", "namespace", "received", "reservation", "total", "ttl")

    def __init__(self, namespace: str, key: bytes, total: int, ttl: int) -> None:
        self.namespace = namespace
        self.key = key
        self.total = total
        self.ttl = ttl
        self.received = 0
        self.reservation: Reservation | None = None
        self.buffer: bytearray | None = None

    def target(self) -> memoryview:
        if self.reservation is not None:
            return self.reservation.view
        assert self.buffer is not None
        return memoryview(self.buffer)


class KVCacheServicer(cachenode_pb2_grpc.KVCacheServicer):
    """Serves one engine (possibly tiered). `engine` may be set after construction."""

    def __init__(self, engine: Engine | None, limits: Limits | None = None, datapath: DataPath | None = None) -> None:
        self.engine = engine
        self.limits = limits or Limits()
        self.datapath = datapath

    # -- validation ----------------------------------------------------------------------

    def _engine(self) -> Engine:
        if self.engine is None:
            raise Unavailable("cache node is starting: engine not ready")
        return self.engine

    def _check_namespace(self, namespace: str) -> None:
        if len(namespace.encode()) > MAX_NAMESPACE_BYTES:
            raise InvalidArgument(f"namespace longer than {MAX_NAMESPACE_BYTES} bytes")
        allowed = self.limits.namespaces
        if allowed is not None and namespace not in allowed:
            raise PermissionDenied(f"namespace {namespace!r} is not served by this node")

    def _check_key(self, key: bytes) -> None:
        if not key:
            raise InvalidArgument("empty key")
        if len(key) > self.limits.max_key_bytes:
            raise InvalidArgument(f"key of {len(key)} bytes is longer than {self.limits.max_key_bytes}")

    def _check_keys(self, keys: Sequence[bytes]) -> None:
        for i, key in enumerate(keys):
            try:
                self._check_key(key)
            except InvalidArgument as exc:
                raise InvalidArgument(f"keys[{i}]: {exc}") from None

    def _check_size(self, size: int) -> None:
        if size > self.limits.max_value_bytes:
            raise ResourceExhausted(
                f"value of {format_size(size)} is over --max-value-bytes {format_size(self.limits.max_value_bytes)}"
            )

    # -- unary ---------------------------------------------------------------------------

    @guard
    async def Put(self, request: cachenode_pb2.PutRequest, context: grpc.aio.ServicerContext) -> Any:
        engine = self._engine()
        self._check_namespace(request.namespace)
        self._check_key(request.key)
        self._check_size(len(request.value))
        await engine.put(request.namespace, request.key, request.value, request.ttl_seconds)
        return cachenode_pb2.PutResponse()

    @guard
    async def Get(self, request: cachenode_pb2.GetRequest, context: grpc.aio.ServicerContext) -> Any:
        engine = self._engine()
        self._check_namespace(request.namespace)
        self._check_key(request.key)
        value = await engine.get(request.namespace, request.key)
        if value is None:
            return cachenode_pb2.GetResponse(found=False)
        return cachenode_pb2.GetResponse(found=True, value=value)

    @guard
    async def Delete(self, request: cachenode_pb2.DeleteRequest, context: grpc.aio.ServicerContext) -> Any:
        engine = self._engine()
        self._check_namespace(request.namespace)
        self._check_key(request.key)
        return cachenode_pb2.DeleteResponse(deleted=await engine.delete(request.namespace, request.key))

    @guard
    async def Exists(self, request: cachenode_pb2.ExistsRequest, context: grpc.aio.ServicerContext) -> Any:
        engine = self._engine()
        self._check_namespace(request.namespace)
        self._check_keys(request.keys)
        present = await engine.exists(request.namespace, list(request.keys)) if request.keys else []
        prefix = 0
        for hit in present:
            if not hit:
                break
            prefix += 1
        return cachenode_pb2.ExistsResponse(present=present, prefix_length=prefix)

    @guard
    async def Stats(self, request: cachenode_pb2.StatsRequest, context: grpc.aio.ServicerContext) -> Any:
        engine = self._engine()
        await engine.refresh_stats()
        return cachenode_pb2.StatsResponse(engines=[engine_stats_message(s) for s in engine.tier_stats()])

    # -- BatchPut ------------------------------------------------------------------------

    def _begin(self, engine: Engine, chunk: PutChunkLike) -> _Incoming:
        """Validates the first chunk of a value and makes room for the whole of it."""
        try:
            self._check_namespace(chunk.namespace)
            self._check_key(chunk.key)
            if chunk.offset != 0:
                raise InvalidArgument(f"chunk out of order: first chunk of a value at offset {chunk.offset}, not 0")
            total = chunk.total_size or len(chunk.data)
            self._check_size(total)
            incoming = _Incoming(chunk.namespace, chunk.key, total, chunk.ttl_seconds)
            if engine.capabilities.zero_copy and isinstance(engine, ZeroCopyEngine):
                incoming.reservation = engine.reserve(chunk.namespace, chunk.key, total, chunk.ttl_seconds)
            elif total != len(chunk.data):
                incoming.buffer = bytearray(total)
            return incoming
        except KvmeshError as exc:
            raise _KeyFailed(exc.code, str(exc)) from None
        except ValueError as exc:
            raise _KeyFailed(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None

    @staticmethod
    def _append(incoming: _Incoming, chunk: PutChunkLike) -> None:
        """Copies one chunk into place after checking it continues the value consistently."""
        if chunk.offset != incoming.received:
            raise _KeyFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"chunk out of order: offset {chunk.offset}, expected {incoming.received}",
            )
        if chunk.total_size and chunk.total_size != incoming.total:
            raise _KeyFailed(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"inconsistent total_size: {chunk.total_size} after {incoming.total}",
            )
        end = incoming.received + len(chunk.data)
        if end > incoming.total:
            raise _KeyFailed(
                grpc.StatusCode.INVALID_ARGUMENT, f"chunks overrun the value: {end} bytes of {incoming.total}"
            )
        if incoming.reservation is None and incoming.buffer is None:
            incoming.received = end  # a single-chunk value: the chunk itself is the value
            return
        incoming.target()[incoming.received : end] = chunk.data
        incoming.received = end

    @staticmethod
    def _drop(engine: Engine, incoming: _Incoming | None) -> None:
        if incoming is not None and incoming.reservation is not None and isinstance(engine, ZeroCopyEngine):
            engine.abort(incoming.reservation)
            incoming.reservation = None

    async def BatchPut(
        self,
        request_iterator: AsyncIterator[PutChunkLike | wire.MalformedMessage],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        try:
            engine = self._engine()
        except KvmeshError as exc:
            await context.abort(exc.code, str(exc))
        stored = 0
        errors: list[cachenode_pb2.KeyError] = []
        pending: list[tuple[str, bytes, bytes | memoryview, int]] = []
        pending_bytes = 0
        current: _Incoming | None = None
        skipping: tuple[str, bytes] | None = None  # a failed value whose remaining chunks are ignored

        def fail(namespace: str, key: bytes, code: grpc.StatusCode, message: str) -> None:
            nonlocal skipping
            errors.append(cachenode_pb2.KeyError(key=key, code=code.name, message=message))
            skipping = (namespace, key)

        async def flush() -> None:
            nonlocal stored, pending_bytes
            batch = list(pending)
            pending.clear()
            pending_bytes = 0
            by_ttl: dict[tuple[str, int], list[tuple[bytes, bytes | memoryview]]] = {}
            for namespace, key, value, ttl in batch:
                by_ttl.setdefault((namespace, ttl), []).append((key, value))
            for (namespace, ttl), items in by_ttl.items():
                try:
                    await engine.put_many(namespace, items, ttl)
                    stored += len(items)
                except Exception as exc:
                    code, message = status_for(exc)
                    if code == grpc.StatusCode.INTERNAL:
                        log.exception("put_many failed")
                    errors.extend(cachenode_pb2.KeyError(key=k, code=code.name, message=message) for k, _ in items)

        try:
            async for chunk in request_iterator:
                if isinstance(chunk, wire.MalformedMessage):
                    self._drop(engine, current)
                    current = None
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, chunk.error)
                    continue  # not reached: abort raises
                if current is not None and (chunk.key != current.key or chunk.namespace != current.namespace):
                    fail(
                        current.namespace,
                        current.key,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"value incomplete: {current.received} of {current.total} bytes before the next key",
                    )
                    self._drop(engine, current)
                    current = None
                if current is None:
                    if skipping == (chunk.namespace, chunk.key) and chunk.offset != 0:
                        continue
                    skipping = None
                    try:
                        current = self._begin(engine, chunk)
                    except _KeyFailed as exc:
                        fail(chunk.namespace, chunk.key, exc.code, str(exc))
                        continue
                try:
                    self._append(current, chunk)
                except _KeyFailed as exc:
                    fail(current.namespace, current.key, exc.code, str(exc))
                    self._drop(engine, current)
                    current = None
                    continue
                if current.received < current.total:
                    continue
                done, current = current, None
                if done.reservation is not None:
                    assert isinstance(engine, ZeroCopyEngine)
                    engine.commit(done.reservation)
                    done.reservation = None
                    stored += 1
                    continue
                value: bytes | memoryview = chunk.data if done.buffer is None else memoryview(done.buffer)
                pending.append((done.namespace, done.key, value, done.ttl))
                pending_bytes += done.total
                if len(pending) >= PUT_FLUSH_ITEMS or pending_bytes >= PUT_FLUSH_BYTES:
                    await flush()
            if current is not None:
                fail(
                    current.namespace,
                    current.key,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stream ended with the value incomplete: {current.received} of {current.total} bytes",
                )
                self._drop(engine, current)
                current = None
            if pending:
                await flush()
        finally:
            self._drop(engine, current)
        return cachenode_pb2.BatchPutResponse(stored=stored, errors=errors)

    # -- BatchGet ------------------------------------------------------------------------

    def _chunks(self, index: int, key: bytes, value: memoryview) -> Iterator[bytes]:
        """Encoded GetChunk messages (see kvmesh.client.wire: one copy of the data per chunk)."""
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
            engine = self._engine()
            self._check_namespace(request.namespace)
            self._check_keys(request.keys)
        except KvmeshError as exc:
            await context.abort(exc.code, str(exc))
        namespace = request.namespace
        keys = list(request.keys)
        if engine.capabilities.zero_copy and isinstance(engine, ZeroCopyEngine):
            for index, key in enumerate(keys):
                pinned = engine.pin(namespace, key)
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
            values = await engine.get_many(namespace, keys)
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

    # -- data path (zero-copy / RDMA), implemented in services/cachenode/datapath/ --------

    async def _no_datapath(self, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "this cache node has no zero-copy/RDMA data path (its engine or configuration does not offer one)",
        )

    async def Attach(
        self, request: cachenode_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cachenode_pb2.AttachResponse]:
        if self.datapath is None:
            await self._no_datapath(context)
            return
        async for response in self.datapath.attach(request, context):
            yield response

    async def Allocate(self, request: cachenode_pb2.AllocateRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.datapath is None:
            await self._no_datapath(context)
        assert self.datapath is not None
        return await self.datapath.allocate(request, context)

    async def Seal(self, request: cachenode_pb2.SealRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.datapath is None:
            await self._no_datapath(context)
        assert self.datapath is not None
        return await self.datapath.seal(request, context)

    async def Acquire(self, request: cachenode_pb2.AcquireRequest, context: grpc.aio.ServicerContext) -> Any:
        if self.datapath is None:
            await self._no_datapath(context)
        assert self.datapath is not None
        return await self.datapath.acquire(request, context)

    async def ReleaseViews(
        self, request: cachenode_pb2.ReleaseViewsRequest, context: grpc.aio.ServicerContext
    ) -> Any:
        if self.datapath is None:
            await self._no_datapath(context)
        assert self.datapath is not None
        return await self.datapath.release_views(request, context)
