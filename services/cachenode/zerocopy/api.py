"""The gRPC face of the data path: the KVCache servicer delegates its data-path RPCs here.

`Attach` is a server stream that stays open while the client lives: its first message
tells the client where the node's memory is, and when the stream ends, for whatever reason
(the client closed it, the client process died and its connection broke, the node is
stopping), the session's views are released and its unsealed allocations dropped.

With a security policy, attaching needs admin or namespaces read and write `*`: an attached
client maps the node's whole arena, every tenant's values included, so per-namespace grants
cannot fence it. The session remembers who attached; its calls (over gRPC, only from that same
principal, or over the local control socket, see control.py) act as that principal and still
pass the tenant gate per namespace (permission, rate, quota) like every other plane.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from kvmesh.runtime.errors import FailedPrecondition, KvmeshError, PermissionDenied, Unavailable, guard
from kvmesh.security.identity import current_principal
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.storage.base import Pinned, Storage
from kvmesh.services.cachenode.storage.tiered import TieredStorage
from kvmesh.services.cachenode.tenants import TenantGate
from kvmesh.services.cachenode.zerocopy.attachments import Attachment, AttachmentTable, ZeroCopyLimits
from kvmesh.services.cachenode.zerocopy.control import ControlSocket
from kvmesh.services.cachenode.zerocopy.exports import exports_of
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import cachenode_pb2

log = logging.getLogger("kvmesh.cachenode.zerocopy")


class ZeroCopyApi:
    """Data-path sessions over one node's storage; `start()` runs the allocation sweeper."""

    def __init__(
        self, storage: Storage, limits: ZeroCopyLimits | None = None, control_socket: bool = True,
        tenants: TenantGate | None = None,
    ) -> None:
        self.limits = limits or ZeroCopyLimits()
        self.tenants = tenants or TenantGate()
        self._storage = storage.mappable()
        # With a tier list, the data path works on L1 and keeps the tiers' contract: sealed
        # values are written through to the lower tiers, and acquiring a value that only a
        # lower tier holds promotes it into L1 first.
        self._tiered = storage if isinstance(storage, TieredStorage) and self._storage is not None else None
        self._storage_name = storage.name
        exports = exports_of(self._storage) if self._storage is not None else {}
        self.table: AttachmentTable | None = (
            AttachmentTable(self._storage, exports, self.limits) if self._storage is not None else None
        )
        self._sweeper: asyncio.Task[None] | None = None
        self._draining = False
        # Shared-memory clients may make their calls over a Unix socket instead of gRPC.
        self.control: ControlSocket | None = (
            ControlSocket(self, self.limits.max_sessions)
            if control_socket and cachenode_pb2.TRANSPORT_SHM in exports
            else None
        )

    @classmethod
    def for_node(
        cls,
        storage: Storage,
        *,
        allocation_timeout_ms: int,
        requests: Limits,
        max_sessions: int = ZeroCopyLimits.max_sessions,
        max_views: int = ZeroCopyLimits.max_views,
        max_pinned_fraction: float = ZeroCopyLimits.max_pinned_fraction,
        view_lease_ms: int = int(ZeroCopyLimits.view_lease_s * 1000),
        control_socket: bool = True,
        tenants: TenantGate | None = None,
    ) -> ZeroCopyApi | None:
        """The data path of a cache node, from its settings; None when its storage offers no transport."""
        storage_zc = storage.mappable()
        if storage_zc is None or not exports_of(storage_zc):
            return None
        return cls(
            storage,
            ZeroCopyLimits(
                requests=requests,
                allocation_timeout_s=allocation_timeout_ms / 1000,
                max_sessions=max_sessions,
                max_views=max_views,
                max_pinned_fraction=max_pinned_fraction,
                view_lease_s=view_lease_ms / 1000,
            ),
            control_socket=control_socket,
            tenants=tenants,
        )

    @property
    def transports(self) -> list[int]:
        return sorted(self.table.exports) if self.table is not None else []

    async def start(self) -> None:
        if self._sweeper is None and self.table is not None:
            self._sweeper = asyncio.create_task(self._sweep(), name="zerocopy-sweeper")
        if self.control is not None:
            try:
                await self.control.start()
            except OSError as exc:  # e.g. no Unix sockets here: clients keep using gRPC
                log.warning("no local control socket (%s): shared-memory clients use gRPC calls", exc)
                self.control = None

    def drain(self) -> None:
        """The node is stopping: end every session (their Attach streams complete, so the
        server's graceful stop does not wait for them) and refuse new ones."""
        self._draining = True
        if self.table is not None:
            self.table.close()

    async def close(self) -> None:
        """Ends every session (their Attach streams finish) and stops the sweeper; safe twice."""
        if self.table is not None:
            self.table.close()
        if self.control is not None:
            await self.control.close()
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None

    async def _sweep(self) -> None:
        assert self.table is not None
        period = max(0.01, min(1.0, self.limits.allocation_timeout_s / 4, self.limits.view_lease_s / 4))
        while True:
            await asyncio.sleep(period)
            try:
                self.table.expire()
            except Exception:
                log.exception("allocation sweep failed")

    def _table(self) -> AttachmentTable:
        if self.table is None:
            raise FailedPrecondition(
                f"storage {self._storage_name} keeps no memory clients can reach: the data path needs "
                "memory://?arena=shm (same host) or rdma:// (remote)"
            )
        return self.table

    def _session(self, session_id: str) -> Attachment:
        return self._table().get(session_id)

    def session(self, session_id: str) -> Attachment:
        """The open session `session_id` (NotFound otherwise)."""
        return self._session(session_id)

    # -- RPCs ----------------------------------------------------------------------------

    async def attach(
        self, request: cachenode_pb2.AttachRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[cachenode_pb2.AttachResponse]:
        try:
            if self._draining:
                raise Unavailable("the cache node is stopping")
            table = self._table()
            principal = current_principal()
            self.tenants.authorizer.check_every_namespace(principal)
            session = table.open(request.client_id, request.transport, principal)
        except KvmeshError as exc:
            await context.abort(exc.code, str(exc))
            return
        export = session.export
        try:
            yield cachenode_pb2.AttachResponse(
                session_id=session.id,
                transport=export.transport,  # type: ignore[arg-type]
                segment=export.segment,
                segment_size=export.size,
                base_address=export.base_address,
                allocation_timeout_ms=int(self.limits.allocation_timeout_s * 1000),
                view_lease_ms=int(self.limits.view_lease_s * 1000),
                control_socket=(
                    self.control.address
                    if self.control is not None and export.transport == cachenode_pb2.TRANSPORT_SHM
                    else ""
                ),
            )
            await session.ended.wait()
        finally:
            # Runs on cancellation too (the client went away): nothing it held survives it.
            table.end(session)

    # The four calls of an attached client. Each is served over gRPC (below) and, for a client
    # on this host, over the local control socket (control.py); the `handle_*` methods are the
    # same logic for both and raise KvmeshError on bad input.

    @guard
    async def allocate(
        self, request: cachenode_pb2.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.AllocateResponse:
        self._owned(request.session_id)
        return await self.handle_allocate(request)

    @guard
    async def seal(
        self, request: cachenode_pb2.SealRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.SealResponse:
        self._owned(request.session_id)
        return await self.handle_seal(request)

    @guard
    async def acquire(
        self, request: cachenode_pb2.AcquireRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.AcquireResponse:
        self._owned(request.session_id)
        return await self.handle_acquire(request)

    @guard
    async def release_views(
        self, request: cachenode_pb2.ReleaseViewsRequest, context: grpc.aio.ServicerContext
    ) -> cachenode_pb2.ReleaseViewsResponse:
        self._owned(request.session_id)
        return await self.handle_release_views(request)

    def _owned(self, session_id: str) -> None:
        """With a policy, a session's gRPC calls come only from the principal that attached it."""
        if not self.tenants.enforcing:
            return
        caller, owner = current_principal(), self._session(session_id).principal
        if caller is None or owner is None or caller.name != owner.name:
            raise PermissionDenied(f"data-path session {session_id!r} belongs to another principal")

    @property
    def calls_complete_at_once(self) -> bool:
        """True when no call ever awaits (no tier list below L1): then the `*_now` forms serve them."""
        return self._tiered is None

    async def handle_allocate(self, request: cachenode_pb2.AllocateRequest) -> cachenode_pb2.AllocateResponse:
        return self.allocate_now(request)

    def allocate_now(self, request: cachenode_pb2.AllocateRequest) -> cachenode_pb2.AllocateResponse:
        session = self._session(request.session_id)
        items = [(i.key, i.size) for i in request.items] or [(request.key, request.size)]
        self.limits.requests.check_namespace(request.namespace)
        self.tenants.write(session.principal, request.namespace, [(bytes(k), s) for k, s in items])
        allocations = self._table().allocate(session, request.namespace, items, request.ttl_seconds)
        segment = session.export.segment
        messages = [
            cachenode_pb2.Allocation(
                allocation_id=a.id,
                region=cachenode_pb2.Region(segment=segment, offset=a.write.offset, size=a.write.size),
            )
            for a in allocations
        ]
        if request.items:
            return cachenode_pb2.AllocateResponse(allocations=messages)
        return cachenode_pb2.AllocateResponse(allocation_id=messages[0].allocation_id, region=messages[0].region)

    async def handle_seal(self, request: cachenode_pb2.SealRequest) -> cachenode_pb2.SealResponse:
        published = self._seal(request)
        if published and self._tiered is not None and self._tiered.write_mode == "through":
            await self._write_through(published)
        return cachenode_pb2.SealResponse()

    def seal_now(self, request: cachenode_pb2.SealRequest) -> cachenode_pb2.SealResponse:
        assert self.calls_complete_at_once
        self._seal(request)
        return cachenode_pb2.SealResponse()

    def _seal(self, request: cachenode_pb2.SealRequest) -> list[tuple[str, bytes]]:
        session = self._session(request.session_id)
        ids = [request.allocation_id] if request.allocation_id else []
        ids.extend(request.allocation_ids)
        return self._table().seal(session, ids, request.abort)

    async def _write_through(self, published: list[tuple[str, bytes]]) -> None:
        assert self._tiered is not None and self._storage is not None
        for namespace, key in published:
            pinned = self._storage.pin(namespace, key)
            if pinned is None:  # already replaced or evicted: nothing to write down
                continue
            with pinned:
                for tier in reversed(self._tiered.tiers[1:]):
                    await tier.put(namespace, key, pinned.view)

    async def handle_acquire(self, request: cachenode_pb2.AcquireRequest) -> cachenode_pb2.AcquireResponse:
        session, held_views = self._acquire(request)
        table = self._table()
        missing = [i for i, held in enumerate(held_views) if held is None]
        if missing and self._tiered is not None:
            keys = [request.keys[i] for i in missing]
            promoted = await self._tiered.get_many(request.namespace, keys)
            again = [i for i, value in zip(missing, promoted, strict=True) if value is not None]
            if again:
                self._session(request.session_id)  # it may have ended while the lower tier answered
                retried = table.acquire(session, request.namespace, [request.keys[i] for i in again])
                for i, held in zip(again, retried, strict=True):
                    held_views[i] = held
        return self._views(session, held_views)

    def acquire_now(self, request: cachenode_pb2.AcquireRequest) -> cachenode_pb2.AcquireResponse:
        assert self.calls_complete_at_once
        session, held_views = self._acquire(request)
        return self._views(session, held_views)

    def _acquire(self, request: cachenode_pb2.AcquireRequest) -> tuple[Attachment, list[tuple[int, Pinned] | None]]:
        session = self._session(request.session_id)
        table = self._table()
        if request.release_view_ids:
            table.release(session, request.release_view_ids)
        self.limits.requests.check_namespace(request.namespace)
        self.tenants.read(session.principal, request.namespace)
        return session, table.acquire(session, request.namespace, request.keys)

    @staticmethod
    def _views(session: Attachment, held_views: list[tuple[int, Pinned] | None]) -> cachenode_pb2.AcquireResponse:
        segment = session.export.segment
        views = []
        for held in held_views:
            if held is None:
                views.append(cachenode_pb2.View(found=False))
                continue
            view_id, pinned = held
            region = cachenode_pb2.Region(segment=segment, offset=pinned.offset, size=pinned.size)
            views.append(cachenode_pb2.View(found=True, view_id=view_id, region=region))
        return cachenode_pb2.AcquireResponse(views=views)

    async def handle_release_views(
        self, request: cachenode_pb2.ReleaseViewsRequest
    ) -> cachenode_pb2.ReleaseViewsResponse:
        return self.release_views_now(request)

    def release_views_now(self, request: cachenode_pb2.ReleaseViewsRequest) -> cachenode_pb2.ReleaseViewsResponse:
        session = self._session(request.session_id)
        released = self._table().release(session, request.view_ids)
        return cachenode_pb2.ReleaseViewsResponse(released=released)
