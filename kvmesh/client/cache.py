"""`CacheClient`: what an inference engine embeds to offload and reuse KV-cache blocks.

It follows `Watch(ROLE_CACHENODE)` (or takes a static node list), places each key on
`replicas` nodes by a capacity-weighted consistent-hash ring, keeps one pooled gRPC channel
per node, fans batches out to the nodes concurrently (values chunked over BatchPut and
BatchGet streams), and retries transient failures with full-jitter backoff under a
deadline. A node that is down or dies mid-call turns into cache misses (and failed puts),
never into an exception for the caller: a cache must never fail the inference it speeds up.

Values take the fastest path a node offers: the shared-memory path to a co-located node
(local.py), else the node's bulk data plane (dataplane.py, advertised as the member label
`data-endpoint`), else gRPC. `get_into`/`put_from` and their batched forms read into and
write from the caller's own buffers (numpy arrays, CPU torch tensors, memoryviews).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np

from kvmesh import wire
from kvmesh.backoff import Backoff
from kvmesh.blocks import BlockHasher
from kvmesh.client.buffers import byte_view
from kvmesh.client.dataplane import (
    MISS,
    TOO_SMALL,
    DataPlaneConnecting,
    DataPlanePool,
    DataPlaneRefused,
    DataPlaneUnavailable,
)
from kvmesh.client.hashring import HashRing
from kvmesh.client.local import LocalDataPath, LocalPaths, LocalPathUnavailable
from kvmesh.membership import MembershipChange, MembershipWatcher
from kvmesh.runtime.channels import DEFAULT_MAX_MESSAGE_BYTES, open_channel
from kvmesh.security.client import process_client_tls
from kvmesh.security.tls import ClientTLS, client_ssl_context
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc, common_pb2

log = logging.getLogger("kvmesh.client")

T = TypeVar("T")
# A value to store: bytes, or a byte view of a caller's buffer.
Value = bytes | bytearray | memoryview

# Worth retrying on the same node; anything else (INVALID_ARGUMENT...) is final.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED})
# After the data plane of a node failed to connect or broke, gRPC carries its values this long.
DATA_PLANE_RETRY_S = 5.0


class _Retry:
    """Retries of one call on one node: backoff between attempts, none past the deadline."""

    def __init__(self, backoff: Backoff, deadline_s: float) -> None:
        self._backoff = backoff
        self._end = time.monotonic() + deadline_s
        self._attempt = 0

    async def wait(self) -> bool:
        """Sleeps before the next attempt; False (no sleep) once the deadline has passed."""
        left = self._end - time.monotonic()
        if left <= 0:
            return False
        await asyncio.sleep(min(left, self._backoff.delay(self._attempt)))
        self._attempt += 1
        return True


@dataclass(frozen=True)
class NodeInfo:
    """A cache node as the client knows it."""

    id: str
    address: str
    capacity_bytes: int = 0
    data_endpoint: str = ""  # host:port of its bulk data plane ("" when it offers none)


class _Node:
    """One node's pooled channel and stub (a gRPC channel multiplexes all calls over HTTP/2)."""

    def __init__(self, info: NodeInfo, max_message_bytes: int, data: DataPlanePool | None = None,
                 tls: ClientTLS | None = None) -> None:
        self.info = info
        self.data = data
        self.data_down_until = 0.0
        self.channel = open_channel(info.address, max_message_bytes, tls=tls)
        self.stub = cachenode_pb2_grpc.KVCacheStub(self.channel)
        # The value-carrying streams use hand-coded messages (kvmesh.wire): fewer copies.
        self.batch_put = self.channel.stream_unary(
            "/kvmesh.v1.KVCache/BatchPut",
            request_serializer=wire.identity,
            response_deserializer=cachenode_pb2.BatchPutResponse.FromString,
        )
        self.batch_get = self.channel.unary_stream(
            "/kvmesh.v1.KVCache/BatchGet",
            request_serializer=cachenode_pb2.BatchGetRequest.SerializeToString,
            response_deserializer=wire.decode_get_chunk,
        )

    async def close(self) -> None:
        if self.data is not None:
            await self.data.close()
        await self.channel.close()


class CacheClient:
    """Async client of a mesh of cache nodes. Build it with `connect()` or `from_nodes()`."""

    def __init__(
        self,
        *,
        namespace: str = "",
        replicas: int = 1,
        retry_deadline_s: float = 1.0,
        call_timeout_s: float = 30.0,
        chunk_bytes: int = 4 * 1024**2,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        backoff: Backoff | None = None,
        hasher: BlockHasher | None = None,
        local: str = "auto",
        data_plane: str = "auto",
        data_ssl: ssl.SSLContext | None = None,
        data_connections: int = 2,
        tls: ClientTLS | None = None,
    ) -> None:
        if replicas < 1:
            raise ValueError("replicas must be at least 1")
        self.namespace = namespace
        self.replicas = replicas
        self.retry_deadline_s = retry_deadline_s
        self.call_timeout_s = call_timeout_s
        self.chunk_bytes = min(chunk_bytes, max_message_bytes - 64 * 1024)
        self.max_message_bytes = max_message_bytes
        self.backoff = backoff or Backoff(base_s=0.02, cap_s=0.5)
        self.hasher = hasher or BlockHasher(namespace=namespace)
        self._nodes: dict[str, _Node] = {}
        self.ring = HashRing({})
        self._watcher: MembershipWatcher | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        # Zero-copy shared-memory path to co-located nodes (kvmesh/client/local.py): "auto"
        # (the default) detects them and falls back to gRPC for the others, "always" is
        # --local, "never" keeps every byte on gRPC.
        self._local = LocalPaths(local)
        # Bulk data plane (kvmesh/client/dataplane.py): "auto" uses it where a node advertises
        # one, "never" keeps values on gRPC. `data_ssl` makes its connections TLS.
        if data_plane not in ("auto", "never"):
            raise ValueError("data_plane must be 'auto' or 'never'")
        self.data_plane = data_plane
        self.data_ssl = data_ssl
        self.data_connections = data_connections
        # Credentials for every connection to the nodes (gRPC and the data plane): `tls`, else the
        # process's --tls-* / KVMESH_TLS_* files and --auth-token-file (None: plaintext, anonymous).
        self.tls = tls or process_client_tls()

    # -- construction --------------------------------------------------------------------

    @classmethod
    async def connect(
        cls, metadata_addresses: Sequence[str] | str, *, sync_timeout_s: float = 10.0, **kwargs: object
    ) -> CacheClient:
        """Follows the cache nodes registered with the metadata service."""
        if isinstance(metadata_addresses, str):
            metadata_addresses = [a.strip() for a in metadata_addresses.split(",") if a.strip()]
        client = cls(**kwargs)  # type: ignore[arg-type]
        client._watcher = MembershipWatcher(metadata_addresses, common_pb2.ROLE_CACHENODE, client._on_change)
        await client._watcher.start()
        try:
            await client._watcher.wait_synced(sync_timeout_s)
        except BaseException:
            await client.close()
            raise
        return client

    @classmethod
    async def from_nodes(cls, nodes: Sequence[NodeInfo], **kwargs: object) -> CacheClient:
        """A client over a fixed node list (no metadata service)."""
        client = cls(**kwargs)  # type: ignore[arg-type]
        client.set_nodes(nodes)
        return client

    def set_nodes(self, nodes: Sequence[NodeInfo]) -> None:
        """Replaces the node set (static use, and tests); channels of unchanged nodes are kept."""
        wanted = {n.id: n for n in nodes}
        for node_id in list(self._nodes):
            node = self._nodes[node_id]
            if (
                node_id not in wanted
                or wanted[node_id].address != node.info.address
                or wanted[node_id].data_endpoint != node.info.data_endpoint
            ):
                self._close_later(self._nodes.pop(node_id))
        for node_id, info in wanted.items():
            if node_id in self._nodes:
                self._nodes[node_id].info = info
            else:
                self._nodes[node_id] = _Node(info, self.max_message_bytes, self._data_pool_for(info), self.tls)
        self.ring = HashRing({n.id: n.capacity_bytes for n in wanted.values()})

    def _data_pool_for(self, info: NodeInfo) -> DataPlanePool | None:
        if self.data_plane == "never" or not info.data_endpoint:
            return None
        tls = self.tls
        ssl_context = self.data_ssl
        if ssl_context is None and tls is not None:
            ssl_context = client_ssl_context(tls.files)  # the gRPC channels' CA and certificate
        return DataPlanePool(
            info.data_endpoint,
            ssl_context=ssl_context,
            connections=self.data_connections,
            call_timeout_s=self.call_timeout_s,
            retry_after_s=DATA_PLANE_RETRY_S,
            token=tls.token if tls is not None else None,
            server_hostname=tls.files.tls_server_name if tls is not None else None,
        )

    def _close_later(self, node: _Node) -> None:
        # Calls in flight on a departing node finish or fail on their own; the channel is
        # closed with a grace period, tracked so close() can wait for it.
        if node.data is not None:
            data_close = asyncio.get_running_loop().create_task(node.data.close(), name="kvmesh-client-close-data")
            self._closing.add(data_close)
            data_close.add_done_callback(self._closing.discard)
        task = asyncio.get_running_loop().create_task(node.channel.close(grace=1.0), name="kvmesh-client-close")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _on_change(self, change: MembershipChange) -> None:
        assert self._watcher is not None
        members = self._watcher.members.values()
        self.set_nodes(
            [
                NodeInfo(m.id, m.address, m.capacity_bytes, m.labels.get("data-endpoint", ""))
                for m in members
                if m.address
            ]
        )
        log.info(
            "cache nodes changed",
            extra={"nodes": len(self._nodes), "joined": len(change.joined), "left": len(change.left)},
        )

    @property
    def nodes(self) -> dict[str, NodeInfo]:
        return {node_id: node.info for node_id, node in self._nodes.items()}

    async def close(self) -> None:
        """Stops following membership and closes every channel (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        if self._watcher is not None:
            await self._watcher.close()
        await self._local.close()
        nodes, self._nodes = list(self._nodes.values()), {}
        await asyncio.gather(*(n.close() for n in nodes), return_exceptions=True)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def __aenter__(self) -> CacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- placement and retries -----------------------------------------------------------

    def placement(self, key: bytes) -> list[str]:
        """Node ids holding `key`, primary first."""
        return self.ring.lookup(key, self.replicas)

    def _retry(self) -> _Retry:
        return _Retry(self.backoff, self.retry_deadline_s)

    async def _call(self, node_id: str, op: Callable[[cachenode_pb2_grpc.KVCacheStub], Awaitable[T]]) -> T | None:
        """Runs `op` on a node, retrying transient errors until the deadline; None when it fails."""
        retry = self._retry()
        while True:
            node = self._nodes.get(node_id)
            if node is None:
                return None
            try:
                return await op(node.stub)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    log.warning("cache node %s refused a call: %s %s", node_id, exc.code().name, exc.details())
                    return None
                if not await retry.wait():
                    log.debug("cache node %s unavailable: %s", node_id, exc.code().name)
                    return None

    # -- single keys ---------------------------------------------------------------------

    async def put(self, key: bytes, value: Value, ttl_seconds: int = 0) -> bool:
        """Stores on every replica; True when at least one node stored it."""
        return (await self.put_many([(key, value)], ttl_seconds)) == 1

    async def get(self, key: bytes) -> bytes | None:
        return (await self.get_many([key]))[0]

    async def delete(self, key: bytes) -> bool:
        request = cachenode_pb2.DeleteRequest(namespace=self.namespace, key=key)
        timeout = self.call_timeout_s
        results = await asyncio.gather(
            *(self._call(n, lambda stub: stub.Delete(request, timeout=timeout)) for n in self.placement(key))
        )
        return any(r is not None and r.deleted for r in results)

    # -- batches -------------------------------------------------------------------------

    def _put_chunks(self, items: Sequence[tuple[bytes, Value]], ttl: int) -> Callable[[], AsyncIterator[bytes]]:
        step = self.chunk_bytes
        namespace = self.namespace

        async def chunks() -> AsyncIterator[bytes]:
            for key, value in items:
                view = memoryview(value)
                size = view.nbytes
                for offset in range(0, max(size, 1), step):
                    yield wire.encode_put_chunk(namespace, key, size, offset, view[offset : offset + step], ttl)

        return chunks

    async def _local_path(self, node_id: str) -> LocalDataPath | None:
        node = self._nodes.get(node_id)
        return None if node is None else await self._local.for_node(node_id, node.info.address, node.stub)

    def _data_pool(self, node_id: str) -> DataPlanePool | None:
        """The node's data plane, unless it has none or failed a moment ago."""
        node = self._nodes.get(node_id)
        if node is None or node.data is None or time.monotonic() < node.data_down_until:
            return None
        return node.data

    def _data_failed(self, node_id: str, exc: Exception) -> None:
        node = self._nodes.get(node_id)
        if isinstance(exc, DataPlaneConnecting):  # not a failure: the next call will find it ready
            return
        if node is not None:
            node.data_down_until = time.monotonic() + DATA_PLANE_RETRY_S
        log.debug("data plane of %s failed (%s): using gRPC for %.0f s", node_id, exc, DATA_PLANE_RETRY_S)

    async def _batch_put_node(self, node_id: str, items: Sequence[tuple[bytes, Value]], ttl: int) -> set[bytes]:
        """Keys the node acknowledged."""
        local = await self._local_path(node_id)
        if local is not None:
            try:
                await local.put_many(self.namespace, items, ttl)
                return {k for k, _ in items}
            except (LocalPathUnavailable, grpc.aio.AioRpcError) as exc:
                log.debug("local path to %s failed (%s): using gRPC", node_id, exc)
        pool = self._data_pool(node_id)
        if pool is not None:
            try:
                codes = await pool.put(self.namespace, [k for k, _ in items], [memoryview(v) for _, v in items], ttl)
                return {k for (k, _), code in zip(items, codes, strict=True) if code == 0}
            except DataPlaneRefused as exc:
                log.warning("cache node %s refused a put: %s", node_id, exc)
                return set()
            except DataPlaneUnavailable as exc:
                self._data_failed(node_id, exc)
        make = self._put_chunks(items, ttl)

        async def op(stub: cachenode_pb2_grpc.KVCacheStub) -> cachenode_pb2.BatchPutResponse:
            node = self._nodes[node_id]
            resp: cachenode_pb2.BatchPutResponse = await node.batch_put(make(), timeout=self.call_timeout_s)
            return resp

        resp = await self._call(node_id, op)
        if resp is None:
            return set()
        failed = {e.key for e in resp.errors}
        for err in resp.errors[:3]:
            log.debug("node %s did not store a key: %s %s", node_id, err.code, err.message)
        return {k for k, _ in items if k not in failed}

    async def put_many(self, items: Sequence[tuple[bytes, Value]], ttl_seconds: int = 0) -> int:
        """Stores values on their replicas, one stream per node, all nodes at once.

        Returns how many keys at least one node stored.
        """
        by_node: dict[str, list[tuple[bytes, Value]]] = {}
        for key, value in items:
            for node_id in self.placement(key):
                by_node.setdefault(node_id, []).append((key, value))
        results = await _all([self._batch_put_node(n, its, ttl_seconds) for n, its in by_node.items()])
        stored: set[bytes] = set().union(*results) if results else set()
        return sum(1 for key, _ in items if key in stored)

    async def _batch_get_node(self, node_id: str, keys: list[bytes]) -> list[bytes | None]:
        """Values from one node; what it could not answer (it died mid-stream) stays None."""
        local = await self._local_path(node_id)
        if local is not None:
            try:
                return await local.get_many(self.namespace, keys)
            except (LocalPathUnavailable, grpc.aio.AioRpcError) as exc:
                log.debug("local path to %s failed (%s): using gRPC", node_id, exc)
        pool = self._data_pool(node_id)
        if pool is not None:
            try:
                return [None if v is None else bytes(v) for v in await pool.get(self.namespace, keys)]
            except DataPlaneRefused as exc:
                log.warning("cache node %s refused a get: %s", node_id, exc)
                return [None] * len(keys)
            except DataPlaneUnavailable as exc:
                self._data_failed(node_id, exc)
        return await self._grpc_get_node(node_id, keys)

    async def _grpc_get_node(self, node_id: str, keys: list[bytes]) -> list[bytes | None]:
        out: list[bytes | None] = [None] * len(keys)
        buffers: dict[int, bytearray] = {}
        request = cachenode_pb2.BatchGetRequest(namespace=self.namespace, keys=keys)
        retry = self._retry()
        while True:
            node = self._nodes.get(node_id)
            if node is None:
                return out
            try:
                async for chunk in node.batch_get(request, timeout=self.call_timeout_s):
                    if not chunk.found or chunk.index >= len(keys):
                        continue
                    if chunk.offset == 0 and len(chunk.data) == chunk.total_size:
                        out[chunk.index] = bytes(chunk.data)  # the common case: one message
                        continue
                    buf = buffers.get(chunk.index)
                    if buf is None or chunk.offset == 0:
                        buf = buffers[chunk.index] = bytearray()
                    if chunk.offset != len(buf):
                        continue  # out of order: the value is dropped (a miss), never returned torn
                    buf += chunk.data
                    if len(buf) == chunk.total_size:
                        out[chunk.index] = bytes(buffers.pop(chunk.index))
                return out
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE or any(v is not None for v in out) or buffers:
                    # Already got part of the answer: keep it, the rest are misses.
                    return out
                if not await retry.wait():
                    return out

    def _by_rank(self, places: list[list[str]], rank: int, pending: Callable[[int], bool]) -> dict[str, list[int]]:
        """Indexes still `pending`, grouped by the node of the given replica rank."""
        by_node: dict[str, list[int]] = {}
        for i, nodes in enumerate(places):
            if pending(i) and rank < len(nodes):
                by_node.setdefault(nodes[rank], []).append(i)
        return by_node

    async def get_many(self, keys: Sequence[bytes]) -> list[bytes | None]:
        """Values in order (None = miss). Each key is read from its primary; misses caused by
        a node failure are read again from the next replica."""
        keys = list(keys)
        found: list[bytes | None] = [None] * len(keys)
        places = [self.placement(k) for k in keys]
        for rank in range(self.replicas):
            by_node = self._by_rank(places, rank, lambda i: found[i] is None)
            if not by_node:
                break
            results = await _all([self._batch_get_node(n, [keys[i] for i in idx]) for n, idx in by_node.items()])
            for idx, values in zip(by_node.values(), results, strict=True):
                for i, value in zip(idx, values, strict=True):
                    if value is not None:
                        found[i] = value
        return found

    # -- caller-provided buffers -----------------------------------------------------------

    async def get_into(self, key: bytes, buffer: object) -> int:
        """Reads a value into `buffer`; returns its size, MISS (-1) or TOO_SMALL (-2)."""
        return (await self.batch_get_into([key], [buffer]))[0]

    async def batch_get_into(self, keys: Sequence[bytes], buffers: Sequence[object]) -> list[int]:
        """Reads each value into its buffer (memoryview, bytearray, numpy array, CPU torch tensor).

        Per key: the value's size, MISS (-1) or TOO_SMALL (-2, the buffer was left unspecified).
        Over the data plane the bytes land straight in the buffers, with no copy in between.
        """
        keys = list(keys)
        if len(buffers) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        views = [byte_view(b, writable=True) for b in buffers]
        sizes = [MISS] * len(keys)
        places = [self.placement(k) for k in keys]
        for rank in range(self.replicas):
            by_node = self._by_rank(places, rank, lambda i: sizes[i] == MISS)
            if not by_node:
                break
            results = await _all(
                [self._get_into_node(n, [keys[i] for i in idx], [views[i] for i in idx]) for n, idx in by_node.items()]
            )
            for idx, got in zip(by_node.values(), results, strict=True):
                for i, size in zip(idx, got, strict=True):
                    sizes[i] = size
        return sizes

    async def _get_into_node(self, node_id: str, keys: list[bytes], views: list[memoryview]) -> list[int]:
        local = await self._local_path(node_id)
        if local is not None:
            # The shared-memory path copies straight from the node's memory (one Acquire for
            # the batch). A value larger than its buffer fails the whole batch there before
            # anything is copied; the copy below then reports TOO_SMALL for that key alone.
            try:
                got = await local.batch_get_into(self.namespace, keys, views)
                return [MISS if size is None else size for size in got]
            except ValueError:
                pass
            except (LocalPathUnavailable, grpc.aio.AioRpcError) as exc:
                log.debug("local path to %s failed (%s): using gRPC", node_id, exc)
        else:
            pool = self._data_pool(node_id)
            if pool is not None:
                try:
                    return await pool.get_into(self.namespace, keys, views)
                except DataPlaneRefused as exc:
                    log.warning("cache node %s refused a get: %s", node_id, exc)
                    return [MISS] * len(keys)
                except DataPlaneUnavailable as exc:
                    self._data_failed(node_id, exc)
        values = await self._batch_get_node(node_id, keys)
        return [_copy_into(view, value) for view, value in zip(views, values, strict=True)]

    async def put_from(self, key: bytes, buffer: object, ttl_seconds: int = 0) -> bool:
        """Stores the bytes of `buffer` (see batch_put_from); True when a node stored them."""
        return (await self.batch_put_from([key], [buffer], ttl_seconds))[0]

    async def batch_put_from(
        self, keys: Sequence[bytes], buffers: Sequence[object], ttl_seconds: int = 0
    ) -> list[bool]:
        """Stores each buffer's bytes under its key, sent straight from the buffers.

        Per key: whether at least one replica stored it. The buffers must not change until
        this returns.
        """
        keys = list(keys)
        if len(buffers) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        items = [(key, byte_view(b, writable=False)) for key, b in zip(keys, buffers, strict=True)]
        by_node: dict[str, list[tuple[bytes, Value]]] = {}
        for key, view in items:
            for node_id in self.placement(key):
                by_node.setdefault(node_id, []).append((key, view))
        results = await _all([self._batch_put_node(n, its, ttl_seconds) for n, its in by_node.items()])
        stored: set[bytes] = set().union(*results) if results else set()
        return [key in stored for key in keys]

    async def exists(self, keys: Sequence[bytes]) -> list[bool]:
        """Presence of each key anywhere in its replica set."""
        keys = list(keys)
        present = [False] * len(keys)
        places = [self.placement(k) for k in keys]
        for rank in range(self.replicas):
            by_node: dict[str, list[int]] = {}
            for i, nodes in enumerate(places):
                if not present[i] and rank < len(nodes):
                    by_node.setdefault(nodes[rank], []).append(i)
            if not by_node:
                break

            async def ask(node_id: str, idx: list[int]) -> list[bool]:
                pool = self._data_pool(node_id)
                if pool is not None:
                    try:
                        return await pool.exists(self.namespace, [keys[i] for i in idx])
                    except DataPlaneRefused as exc:
                        log.warning("cache node %s refused exists: %s", node_id, exc)
                        return [False] * len(idx)
                    except DataPlaneUnavailable as exc:
                        self._data_failed(node_id, exc)
                request = cachenode_pb2.ExistsRequest(namespace=self.namespace, keys=[keys[i] for i in idx])
                resp = await self._call(node_id, lambda stub: stub.Exists(request, timeout=self.call_timeout_s))
                return list(resp.present) if resp is not None else [False] * len(idx)

            results = await asyncio.gather(*(ask(n, idx) for n, idx in by_node.items()))
            for idx, answers in zip(by_node.values(), results, strict=True):
                for i, hit in zip(idx, answers, strict=True):
                    present[i] = present[i] or hit
        return present

    async def exists_prefix(self, keys: Sequence[bytes]) -> int:
        """How many keys, counted from the first, are present across the mesh (stops at the first absent)."""
        prefix = 0
        for hit in await self.exists(keys):
            if not hit:
                break
            prefix += 1
        return prefix

    # -- block keys ----------------------------------------------------------------------

    def keys_for_tokens(self, tokens: Sequence[int] | np.ndarray) -> list[bytes]:
        """Cache keys of each full block of `tokens` (the shared chained block hash)."""
        return self.hasher.token_keys(tokens)

    async def cached_prefix_blocks(self, tokens: Sequence[int] | np.ndarray) -> int:
        """How many leading blocks of a prompt are cached somewhere in the mesh."""
        return await self.exists_prefix(self.keys_for_tokens(tokens))

    async def put_token_blocks(
        self, tokens: Sequence[int] | np.ndarray, blocks: Sequence[bytes], ttl_seconds: int = 0
    ) -> int:
        """Offloads the KV data of a prompt's full blocks (`blocks[i]` belongs to block i)."""
        keys = self.keys_for_tokens(tokens)
        if len(blocks) > len(keys):
            raise ValueError(f"{len(blocks)} blocks for a prompt of {len(keys)} full blocks")
        return await self.put_many(list(zip(keys, blocks, strict=False)), ttl_seconds)

    async def get_token_blocks(self, tokens: Sequence[int] | np.ndarray) -> list[bytes]:
        """The KV data of the longest cached prefix of a prompt (block 0 first; empty: nothing cached)."""
        keys = self.keys_for_tokens(tokens)
        values = await self.get_many(keys[: await self.exists_prefix(keys)])
        prefix: list[bytes] = []
        for value in values:
            if value is None:  # evicted between the two calls: the prefix ends here
                break
            prefix.append(value)
        return prefix

    async def stats(self) -> dict[str, list[cachenode_pb2.EngineStats]]:
        """Stats of every reachable node."""

        async def one(node_id: str) -> tuple[str, list[cachenode_pb2.EngineStats]]:
            resp = await self._call(node_id, lambda stub: stub.Stats(cachenode_pb2.StatsRequest(), timeout=5.0))
            return node_id, list(resp.engines) if resp is not None else []

        return dict(await asyncio.gather(*(one(n) for n in list(self._nodes))))


async def _all(calls: list[Coroutine[Any, Any, T]]) -> list[T]:
    """`asyncio.gather`, without its task when there is one call (a batch on one node)."""
    if len(calls) == 1:
        return [await calls[0]]
    return list(await asyncio.gather(*calls))


def _copy_into(view: memoryview, value: bytes | None) -> int:
    """Copies a value fetched whole into a caller's buffer (the gRPC and local fallbacks)."""
    if value is None:
        return MISS
    if len(value) > view.nbytes:
        return TOO_SMALL
    view[: len(value)] = value
    return len(value)


def node_infos(nodes: Mapping[str, str]) -> list[NodeInfo]:
    """`{id: address}` → NodeInfo list (equal weights)."""
    return [NodeInfo(node_id, address) for node_id, address in nodes.items()]
