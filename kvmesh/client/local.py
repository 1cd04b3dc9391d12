"""The zero-copy data path for a client on the same host as its cache node.

Instead of shipping values through gRPC messages, the client maps the node's shared-memory
segment and moves bytes with one memcpy: a put allocates a region, writes it in place and
seals it; a get acquires a read-only view of the stored bytes and releases it when done.
The node keeps the reference counts (a held view is never evicted or overwritten in
place) and releases everything when this client's Attach stream breaks, so a client that
dies leaks nothing.

Every operation costs one control exchange per batch, whatever the batch's size: a put of
N values is one Allocate and one Seal, a get of N values one Acquire (the views' release
rides on the next Acquire, or leaves on its own after a few milliseconds). `get_into` /
`put_from` and their batch forms copy straight between the shared segment and the caller's
own buffers (bytearray, memoryview, numpy arrays, CPU or pinned torch tensors): one memcpy
per value, no intermediate bytes.

`LocalDataPath.open(stub)` raises `LocalPathUnavailable` when the node is on another host
or keeps no shared memory; the client library then uses the ordinary gRPC path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
import numpy as np

from kvmesh.client.attachment import Attachment, attach, default_client_id
from kvmesh.client.buffers import DEFAULT_COPY_THREADS, Buffer, CopyPool, as_bytes, copy_all
from kvmesh.client.control import GrpcControl, PreferSocket, SocketControl
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

log = logging.getLogger("kvmesh.client.local")

SHM_DIR = Path("/dev/shm")
# Copies at least this large run in a worker thread, so the event loop keeps serving. Smaller
# ones (a KV block: 1-8 MiB, well under a millisecond) are cheaper than the thread hop itself.
DEFAULT_OFFLOAD_BYTES = 16 * 1024 * 1024


class LocalPathUnavailable(Exception):
    """The zero-copy path cannot be used with this node (another host, no shared memory, detached)."""


class ViewReleased(ValueError):
    """A view was read after it was released (its bytes may already hold another value)."""


def _host_of(address: str) -> str:
    host = address.rpartition(":")[0] if ":" in address else address
    return host.strip("[]")


def _is_local_ip(family: int, ip: str) -> bool:
    """True when `ip` belongs to an interface of this host: only then can a socket bind to it."""
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True


def is_local_host(host: str) -> bool:
    """Whether `host` names this machine (blocking: resolves the name)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_UDP)
    except socket.gaierror:
        return False
    return any(_is_local_ip(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos)


async def is_local_address(address: str) -> bool:
    """Whether the node at `host:port` runs on this machine (name resolution off the loop)."""
    return await asyncio.to_thread(is_local_host, _host_of(address))


class SegmentMapping:
    """This process's mapping of a node's shared-memory segment.

    Opened with `os.open` + `mmap`, not `multiprocessing.shared_memory`: on Python 3.11 the
    latter registers the segment with the resource tracker, which would unlink the node's
    memory when this client exits.
    """

    def __init__(self, name: str, size: int, populate: bool = False) -> None:
        if not name or "/" in name or name in (".", ".."):
            raise LocalPathUnavailable(f"bad shared-memory segment name {name!r}")
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except FileNotFoundError:
            raise LocalPathUnavailable(f"segment {name} is not on this host") from None
        try:
            actual = os.fstat(fd).st_size
            if actual < size:
                raise LocalPathUnavailable(f"segment {name} is {actual} bytes, the node announced {size}")
            # populate: map every page now (MAP_POPULATE), not at its first copy (a page fault per 4 KiB).
            flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0)
            self._map: mmap.mmap | None = mmap.mmap(fd, size, flags, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.name = name
        self.size = size
        self._buffer = memoryview(self._map)
        self._array: np.ndarray | None = np.frombuffer(self._buffer, dtype=np.uint8)

    def view(self, offset: int, size: int) -> memoryview:
        if self._map is None:
            raise LocalPathUnavailable(f"segment {self.name} is unmapped")
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"region ({offset}, {size}) lies outside segment {self.name} of {self.size} bytes")
        return self._buffer[offset : offset + size]

    def array(self, offset: int, size: int) -> np.ndarray:
        """The region as a flat uint8 array over the mapping (no copy)."""
        if self._array is None:
            raise LocalPathUnavailable(f"segment {self.name} is unmapped")
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ValueError(f"region ({offset}, {size}) lies outside segment {self.name} of {self.size} bytes")
        return self._array[offset : offset + size]

    def close(self) -> None:
        if self._map is None:
            return
        self._array = None
        with contextlib.suppress(BufferError):  # an array slice is still alive somewhere
            self._buffer.release()
        with contextlib.suppress(BufferError):  # a view is still held: the mapping goes with it
            self._map.close()
        self._map = None


class LocalView:
    """A read-only view of a stored value in the node's memory, valid until released.

    Arrays built on `view` (e.g. `numpy.frombuffer`) must not outlive `release()`: the node
    may reuse the bytes afterwards. Nor may they outlive the node's view lease (`--view-lease-ms`,
    60 s by default): past it the node releases the view itself, and `view` raises ViewReleased.
    """

    __slots__ = ("_view", "expires", "key", "size", "view_id")

    def __init__(self, key: bytes, view_id: int, view: memoryview, expires: float = 0.0) -> None:
        self.key = key
        self.view_id = view_id
        self.size = len(view)
        self.expires = expires  # monotonic end of the node's lease, 0 = none
        self._view: memoryview | None = view

    @property
    def released(self) -> bool:
        return self._view is None

    @property
    def view(self) -> memoryview:
        if self._view is None:
            raise ViewReleased(f"view {self.view_id} of key {self.key.hex()} was released")
        if self.expires and time.monotonic() >= self.expires:
            self._drop()
            raise ViewReleased(f"view {self.view_id} of key {self.key.hex()} outlived the node's view lease")
        return self._view

    def tobytes(self) -> bytes:
        return self.view.tobytes()

    def __len__(self) -> int:
        return self.size

    def _drop(self) -> None:
        if self._view is not None:
            with contextlib.suppress(BufferError):  # a derived array still exists; it must not be read
                self._view.release()
            self._view = None


class LocalDataPath(Attachment):
    """An attached zero-copy session with one cache node on this host."""

    unavailable = LocalPathUnavailable
    label = "data-path"
    task_name = "local-datapath-attach"
    logger = log

    def __init__(
        self,
        stub: cachenode_pb2_grpc.KVCacheStub,
        call: grpc.aio.UnaryStreamCall,
        attached: cachenode_pb2.AttachResponse,
        mapping: SegmentMapping,
        offload_bytes: int,
        rpc_timeout: float,
        release_delay_s: float = 0.01,
        socket: SocketControl | None = None,
        copy_threads: int = DEFAULT_COPY_THREADS,
    ) -> None:
        self._mapping = mapping
        self._offload_bytes = offload_bytes
        self._copies = CopyPool(copy_threads)
        self._held: dict[int, LocalView] = {}
        self._prefer = PreferSocket(socket, GrpcControl(stub, rpc_timeout))
        super().__init__(stub, call, attached, rpc_timeout, release_delay_s, self._prefer)

    @property
    def over_socket(self) -> bool:
        """Whether the calls currently go over the node's local control socket (else gRPC)."""
        return self._prefer.socket is not None and not self._prefer.socket.broken

    @classmethod
    async def open(
        cls,
        stub: cachenode_pb2_grpc.KVCacheStub,
        *,
        client_id: str | None = None,
        offload_bytes: int = DEFAULT_OFFLOAD_BYTES,
        rpc_timeout: float = 10.0,
        release_delay_s: float = 0.01,
        control_socket: bool = True,
        populate: bool = False,
        copy_threads: int = DEFAULT_COPY_THREADS,
    ) -> LocalDataPath:
        """Attaches to the node behind `stub`; LocalPathUnavailable if it cannot share memory with us.

        With `control_socket` (default) the calls go over the node's local control socket
        when it offers one, else over gRPC. `populate` maps the whole segment at once (about
        0.1-0.3 s per GiB, in a worker thread), so that no copy later pays page faults; for
        long-lived clients such as an inference engine. A batch of `offload_bytes` or more is
        copied by up to `copy_threads` threads at once, off the event loop.
        """
        request = cachenode_pb2.AttachRequest(
            client_id=client_id or default_client_id(), transport=cachenode_pb2.TRANSPORT_SHM
        )
        call, attached = await attach(stub, request, rpc_timeout, LocalPathUnavailable, "shared-memory path")
        try:
            if populate:
                mapping = await asyncio.to_thread(SegmentMapping, attached.segment, attached.segment_size, True)
            else:
                mapping = SegmentMapping(attached.segment, attached.segment_size)
        except BaseException:
            call.cancel()
            raise
        socket = None
        if control_socket and attached.control_socket:
            try:
                socket = await SocketControl.connect(attached.control_socket, attached.session_id, rpc_timeout)
            except (OSError, TimeoutError, grpc.aio.AioRpcError) as exc:
                log.info("node's control socket unreachable (%s): data-path calls go over gRPC", exc)
            except BaseException:
                call.cancel()
                mapping.close()
                raise
        return cls(stub, call, attached, mapping, offload_bytes, rpc_timeout, release_delay_s, socket, copy_threads)

    async def _copy_all(self, pairs: list[tuple[np.ndarray, np.ndarray | memoryview]], total: int) -> None:
        """The copies of one batch: inline when small, else in one worker thread (numpy releases the GIL)."""
        if total >= self._offload_bytes:
            await self._copies.copy_all(pairs, total)
        else:
            copy_all(pairs)

    async def _fill(self, allocations: Sequence[cachenode_pb2.Allocation], sources: Sequence[memoryview]) -> None:
        pairs: list[tuple[np.ndarray, np.ndarray | memoryview]] = [
            (self._mapping.array(a.region.offset, len(src)), src) for a, src in zip(allocations, sources, strict=True)
        ]
        await self._copy_all(pairs, sum(len(src) for src in sources))

    # -- caller-owned buffers ------------------------------------------------------------

    async def put_from(self, namespace: str, key: bytes, buf: Buffer, ttl_seconds: int = 0) -> int:
        """Stores the bytes of `buf` (bytes-like, numpy array, CPU/pinned torch tensor) as one value.

        One copy, from `buf` into the slot the node allocated; one Allocate and one Seal.
        Returns the value's size in bytes.
        """
        return (await self.batch_put_from(namespace, [key], [buf], ttl_seconds))[0]

    async def batch_put_from(
        self, namespace: str, keys: Sequence[bytes], bufs: Sequence[Buffer], ttl_seconds: int = 0
    ) -> list[int]:
        """Stores `bufs[i]` under `keys[i]` with one Allocate and one Seal for the whole batch.

        All values become visible together, or none (any failure aborts every allocation).
        Returns each value's size in bytes.
        """
        if len(keys) != len(bufs):
            raise ValueError(f"{len(keys)} keys for {len(bufs)} buffers")
        arrays = [as_bytes(buf, writable=False) for buf in bufs]
        await self.put_many(namespace, [(k, a.data) for k, a in zip(keys, arrays, strict=True)], ttl_seconds)
        return [a.nbytes for a in arrays]

    async def batch_get_into(self, namespace: str, keys: Sequence[bytes], bufs: Sequence[Buffer]) -> list[int | None]:
        """Copies the value of `keys[i]` into the start of `bufs[i]`; one Acquire for the batch.

        Buffers are bytearrays, writable memoryviews, numpy arrays or CPU/pinned torch tensors
        (any dtype; the value's bytes land at the start). Returns each value's size, None for
        a miss (its buffer is untouched). A value larger than its buffer raises ValueError
        before anything is copied.
        """
        if len(keys) != len(bufs):
            raise ValueError(f"{len(keys)} keys for {len(bufs)} buffers")
        arrays = [as_bytes(buf, writable=True) for buf in bufs]
        views = await self._acquire_views(namespace, keys)
        try:
            if len(views) != len(keys):
                raise LocalPathUnavailable(f"node answered {len(views)} views for {len(keys)} keys")
            sizes: list[int | None] = []
            pairs: list[tuple[np.ndarray, np.ndarray | memoryview]] = []
            for key, view, dst in zip(keys, views, arrays, strict=True):
                if not view.found:
                    sizes.append(None)
                    continue
                size = view.region.size
                if size > dst.nbytes:
                    raise ValueError(f"value {key.hex()} of {size} bytes does not fit a buffer of {dst.nbytes}")
                pairs.append((dst, self._mapping.array(view.region.offset, size)))
                sizes.append(size)
            await self._copy_all(pairs, sum(len(src) for _, src in pairs))
            return sizes
        finally:
            if not self._detached:
                self._releases.add([v.view_id for v in views if v.found])

    # -- reads ---------------------------------------------------------------------------

    async def acquire(self, namespace: str, keys: Sequence[bytes]) -> list[LocalView | None]:
        """Read-only views of the values (None for a miss); each holds its value until released."""
        lease_s = self.view_lease_ms / 1000
        expires = time.monotonic() + lease_s if lease_s else 0.0  # taken before asking: errs on the safe side
        views = await self._acquire_views(namespace, keys)
        out: list[LocalView | None] = []
        for key, view in zip(keys, views, strict=True):
            if not view.found:
                out.append(None)
                continue
            region = self._mapping.view(view.region.offset, view.region.size).toreadonly()
            local = LocalView(key, view.view_id, region, expires)
            self._held[view.view_id] = local
            out.append(local)
        return out

    async def release(self, views: Sequence[LocalView | None]) -> int:
        """Gives views back to the node; reading them afterwards raises ViewReleased."""
        ids = [v.view_id for v in views if v is not None and not v.released]
        for v in views:
            if v is not None:
                v._drop()
                self._held.pop(v.view_id, None)
        if not ids or self._detached:
            return 0
        response = await self._control.release_views(
            cachenode_pb2.ReleaseViewsRequest(session_id=self.session_id, view_ids=ids)
        )
        return int(response.released)

    def _release_later(self, views: Sequence[LocalView | None]) -> None:
        """Drops the views now; the node hears with the next Acquire, or after a short delay."""
        ids = []
        for v in views:
            if v is not None and not v.released:
                v._drop()
                self._held.pop(v.view_id, None)
                ids.append(v.view_id)
        if not self._detached:
            self._releases.add(ids)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        """A copy of one value (acquire, copy out, release)."""
        (view,) = await self.acquire(namespace, [key])
        if view is None:
            return None
        try:
            if view.size >= self._offload_bytes:
                return await asyncio.to_thread(view.tobytes)
            return view.tobytes()
        finally:
            self._release_later([view])

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """Copies of several values with two round trips (one Acquire, one ReleaseViews)."""
        views = await self.acquire(namespace, keys)
        try:
            total = sum(v.size for v in views if v is not None)
            if total >= self._offload_bytes:
                return await asyncio.to_thread(lambda: [None if v is None else v.tobytes() for v in views])
            return [None if v is None else v.tobytes() for v in views]
        finally:
            self._release_later(views)

    async def get_into(self, namespace: str, key: bytes, buf: Buffer) -> int | None:
        """Copies one value into the start of a caller's buffer (see `batch_get_into`); its size, or None."""
        return (await self.batch_get_into(namespace, [key], [buf]))[0]

    async def close(self) -> None:
        """Ends the session: the node releases whatever this client still held."""
        for view in self._held.values():
            view._drop()
        self._held.clear()
        await self._end()
        self._prefer.close()
        self._copies.close()
        self._mapping.close()


class LocalPaths:
    """The local paths of one client, one per co-located node, opened on first use.

    `mode`: "auto" (use the path when the node's address is on this host and it offers
    shared memory), "always" (the `--local` flag: try every node; a node that cannot share
    memory still falls back), "never". `for_node` returns None whenever the caller should use
    gRPC, and remembers nodes that cannot do better so it does not ask again.
    """

    MODES = ("auto", "always", "never")

    def __init__(self, mode: str = "auto", client_id: str | None = None) -> None:
        if mode not in self.MODES:
            raise ValueError(f"local path mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        self.mode = mode
        self.client_id = client_id
        self._paths: dict[str, LocalDataPath] = {}
        self._unavailable: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    async def for_node(
        self, node_id: str, address: str, stub: cachenode_pb2_grpc.KVCacheStub
    ) -> LocalDataPath | None:
        if self.mode == "never" or node_id in self._unavailable:
            return None
        async with self._locks.setdefault(node_id, asyncio.Lock()):  # one attach per node at a time
            if node_id in self._unavailable:
                return None
            path = self._paths.get(node_id)
            if path is not None:
                if path.attached:
                    return path
                del self._paths[node_id]  # the node restarted or stopped: attach again
                await path.close()
            return await self._open(node_id, address, stub)

    async def _open(self, node_id: str, address: str, stub: cachenode_pb2_grpc.KVCacheStub) -> LocalDataPath | None:
        if self.mode == "auto" and not await is_local_address(address):
            self._unavailable.add(node_id)
            return None
        try:
            path = await LocalDataPath.open(stub, client_id=self.client_id)
        except LocalPathUnavailable as exc:
            log.info("node %s: no local path (%s); using gRPC", node_id, exc)
            self._unavailable.add(node_id)
            return None
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                # The policy keeps this principal off the node's shared memory: ask no more.
                log.info("node %s: not allowed to attach (%s); using the other paths", node_id, exc.details())
                self._unavailable.add(node_id)
                return None
            log.debug("node %s: attach failed (%s); using gRPC for now", node_id, exc.code().name)
            return None
        self._paths[node_id] = path
        return path

    def forget(self, node_id: str) -> None:
        """The node left the mesh (its path closes with `close()` or the next `for_node`)."""
        self._unavailable.discard(node_id)

    async def close(self) -> None:
        paths, self._paths = list(self._paths.values()), {}
        await asyncio.gather(*(p.close() for p in paths), return_exceptions=True)
