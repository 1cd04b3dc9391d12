"""What the shared-memory and RDMA data paths have in common: an Attach session with a node.

Both attach over gRPC (the open stream is the session: when it breaks, the node releases
everything the client held), allocate regions and seal them for writes, acquire views for
reads and hand the views back in batches. They differ only in how bytes reach the node's
memory (a memcpy into a mapped segment, or one-sided transfers), which each subclass adds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence

import grpc

from kvmesh.client.control import Control, GrpcControl
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

log = logging.getLogger("kvmesh.client.attachment")

Value = bytes | bytearray | memoryview


def default_client_id() -> str:
    """host-pid-random: unique per session, readable in the node's logs."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


async def attach(
    stub: cachenode_pb2_grpc.KVCacheStub,
    request: cachenode_pb2.AttachRequest,
    rpc_timeout: float,
    unavailable: type[Exception],
    what: str,
    on_rpc_error: Callable[[], Awaitable[None]] | None = None,
) -> tuple[grpc.aio.UnaryStreamCall, cachenode_pb2.AttachResponse]:
    """Opens the Attach stream and reads its first answer.

    A node that cannot offer the transport (FAILED_PRECONDITION, UNIMPLEMENTED) or ends the
    stream at once raises `unavailable` ("node offers no {what}: ..."); other RPC errors
    propagate. `on_rpc_error` undoes client-side setup when the RPC fails.
    """
    call = stub.Attach(request)
    try:
        attached = await asyncio.wait_for(call.read(), rpc_timeout)
    except grpc.aio.AioRpcError as exc:
        call.cancel()
        if on_rpc_error is not None:
            await on_rpc_error()
        if exc.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED):
            raise unavailable(f"node offers no {what}: {exc.details()}") from exc
        raise
    except BaseException:
        call.cancel()
        raise
    if attached is grpc.aio.EOF:
        raise unavailable("node ended the Attach stream at once")
    return call, attached


class DeferredReleases:
    """View ids a client is done with, released with its next Acquire or after a short delay.

    Piggy-backing the releases of finished reads on the next read saves one round trip per
    read; the delay bounds how long an idle client keeps values pinned.
    """

    def __init__(self, control: Control, session_id: str, delay_s: float) -> None:
        self._control = control
        self._session_id = session_id
        self._delay_s = delay_s
        self._ids: list[int] = []
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def add(self, view_ids: Sequence[int]) -> None:
        self._ids.extend(view_ids)
        if self._ids and self._timer is None and not self._closed:
            self._timer = asyncio.get_running_loop().call_later(self._delay_s, self._start)

    def take(self) -> list[int]:
        """The ids to send with the next Acquire (the node releases them first)."""
        ids, self._ids = self._ids, []
        return ids

    def _start(self) -> None:
        self._timer = None
        if self._ids and not self._closed and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._flush(), name="kvmesh-view-release")

    async def _flush(self) -> None:
        ids = self.take()
        if not ids:
            return
        try:
            await self._control.release_views(
                cachenode_pb2.ReleaseViewsRequest(session_id=self._session_id, view_ids=ids)
            )
        except grpc.aio.AioRpcError as exc:  # the session is gone: the node released them with it
            log.debug("deferred release of %d views failed: %s", len(ids), exc.code().name)

    async def close(self) -> None:
        """Stops the timer; pending ids are dropped (ending the session releases them on the node)."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._ids.clear()


class Attachment(ABC):
    """An open Attach session: liveness, Allocate/Seal for writes, Acquire and deferred releases.

    Subclasses set `unavailable` (raised once the session ended), `label` and `task_name`
    (for logs and task dumps), and implement `_fill` to move the bytes of a put into the allocated regions.
    """

    unavailable: type[Exception] = Exception
    label = "data-path"
    task_name = "datapath-attach"
    logger = log
    _single_form = True  # a one-value put uses AllocateRequest's key/size fields, not an item list

    def __init__(
        self,
        stub: cachenode_pb2_grpc.KVCacheStub,
        call: grpc.aio.UnaryStreamCall,
        attached: cachenode_pb2.AttachResponse,
        rpc_timeout: float,
        release_delay_s: float,
        control: Control | None = None,
    ) -> None:
        self._stub = stub
        self._call = call
        # How Allocate/Seal/Acquire/ReleaseViews travel: gRPC, or the node's local control socket.
        self._control: Control = control or GrpcControl(stub, rpc_timeout)
        self.session_id = attached.session_id
        self.allocation_timeout_ms = attached.allocation_timeout_ms
        self.view_lease_ms = attached.view_lease_ms  # 0: the node releases views only at session end
        self._timeout = rpc_timeout
        # Views that reads are done with: released with the next Acquire (one round trip
        # instead of two per read) or, when no read follows, after a short delay.
        self._releases = DeferredReleases(self._control, attached.session_id, release_delay_s)
        self._detached = False
        self._follower: asyncio.Task[None] | None = asyncio.create_task(self._follow(), name=self.task_name)

    @property
    def attached(self) -> bool:
        """False once the session ended (node stopped, or `close()`): use the gRPC path then."""
        return not self._detached

    async def _follow(self) -> None:
        try:
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                self.logger.info("%s session %s ended: %s", self.label, self.session_id, exc.code().name)
        finally:
            self._detached = True

    def _check(self) -> None:
        if self._detached:
            raise self.unavailable(f"{self.label} session {self.session_id} has ended")

    # -- writes --------------------------------------------------------------------------

    async def put(self, namespace: str, key: bytes, value: Value, ttl_seconds: int = 0) -> None:
        """Stores one value straight into the node's memory."""
        await self.put_many(namespace, [(key, value)], ttl_seconds)

    async def put_many(self, namespace: str, items: Sequence[tuple[bytes, Value]], ttl_seconds: int = 0) -> None:
        """Stores several values with two round trips in all (one Allocate, one Seal).

        All values become visible together when the Seal returns; on any failure none is
        published (the allocations are aborted).
        """
        self._check()
        if not items:
            return
        sources = [memoryview(value).cast("B") for _, value in items]
        request = cachenode_pb2.AllocateRequest(
            session_id=self.session_id, namespace=namespace, ttl_seconds=ttl_seconds
        )
        single = len(items) == 1 and self._single_form
        if single:
            request.key, request.size = items[0][0], len(sources[0])
        else:
            request.items.extend(
                cachenode_pb2.AllocateItem(key=key, size=len(src)) for (key, _), src in zip(items, sources, strict=True)
            )
        response = await self._control.allocate(request)
        allocations = (
            [cachenode_pb2.Allocation(allocation_id=response.allocation_id, region=response.region)]
            if single
            else list(response.allocations)
        )
        ids = [a.allocation_id for a in allocations]
        sealed = False
        try:
            if len(allocations) != len(items):
                raise self.unavailable(f"node answered {len(allocations)} allocations for {len(items)} values")
            await self._fill(allocations, sources)
            await self._control.seal(cachenode_pb2.SealRequest(session_id=self.session_id, allocation_ids=ids))
            sealed = True
        finally:
            if not sealed and ids:
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
                    await self._control.seal(
                        cachenode_pb2.SealRequest(session_id=self.session_id, allocation_ids=ids, abort=True)
                    )

    @abstractmethod
    async def _fill(self, allocations: Sequence[cachenode_pb2.Allocation], sources: Sequence[memoryview]) -> None:
        """Writes each source into its allocated region (same order, same sizes)."""

    # -- reads ---------------------------------------------------------------------------

    async def _acquire_views(self, namespace: str, keys: Sequence[bytes]) -> list[cachenode_pb2.View]:
        """Pins the values on the node (views found or not, in order), releasing finished reads first."""
        self._check()
        response = await self._control.acquire(
            cachenode_pb2.AcquireRequest(
                session_id=self.session_id,
                namespace=namespace,
                keys=list(keys),
                release_view_ids=self._releases.take(),
            )
        )
        return list(response.views)

    async def _end(self) -> None:
        """Ends the session: the node releases whatever this client still held."""
        await self._releases.close()
        self._call.cancel()
        if self._follower is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        self._detached = True
