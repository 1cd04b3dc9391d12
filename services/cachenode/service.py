"""The cache node as a kvmesh `Service`: storage lifecycle, membership and the bulk data plane.

The storage is built once the server listens (storage URIs are validated by then: a bad one
stops the node with a clear message), then the node registers as ROLE_CACHENODE with its
capacity and reports used bytes with every heartbeat. On shutdown it deregisters before the
server stops, and closes the storage last.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

import grpc

from kvmesh.membership import MemberSession
from kvmesh.runtime.server import Service
from kvmesh.security.policy import PolicyFile
from kvmesh.security.tls import server_ssl_context
from kvmesh.services.cachenode.authorization import NamespaceAuthorizer
from kvmesh.services.cachenode.dataplane.limits import DataPlaneLimits
from kvmesh.services.cachenode.dataplane.server import DataPlaneServer
from kvmesh.services.cachenode.kvcache_api import KVCacheApi
from kvmesh.services.cachenode.kvcache_methods import add_kvcache_to_server
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.quotas import NamespaceQuotas
from kvmesh.services.cachenode.rate_limits import NamespaceRateLimits
from kvmesh.services.cachenode.settings import CacheNodeSettings
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.storage.registry import build_storage
from kvmesh.services.cachenode.storage.write import BATCH_BYTES
from kvmesh.services.cachenode.tenants import TenantGate
from kvmesh.services.cachenode.write_budget import WriteBounds, WriteBudget
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import cachenode_pb2, common_pb2

if TYPE_CHECKING:
    from kvmesh.services.cachenode.zerocopy.api import ZeroCopyApi

log = logging.getLogger("kvmesh.cachenode")

LOAD_CHECK_SECONDS = 0.5
LOAD_SETTLE_SECONDS = 1.5


class CacheNodeService(Service):
    """A KVCache server over one (possibly tiered) storage."""

    name = "cachenode"
    service_names = (cachenode_pb2.DESCRIPTOR.services_by_name["KVCache"].full_name,)

    def __init__(
        self, settings: CacheNodeSettings, storage: Storage | None = None, zerocopy: ZeroCopyApi | None = None
    ) -> None:
        self.settings = settings
        limits = Limits(
            max_key_bytes=settings.max_key_bytes,
            max_value_bytes=settings.max_value_bytes,
            chunk_bytes=min(settings.chunk_bytes, settings.max_message_bytes - 64 * 1024),
            namespaces=settings.allowed_namespaces,
        )
        bounds = WriteBounds(
            stream_bytes=settings.max_value_bytes + BATCH_BYTES,
            peer_bytes=settings.max_write_peer_bytes,
            total_bytes=settings.max_write_total_bytes,
            peer_streams=settings.max_write_streams_per_peer,
            streams=settings.max_write_streams,
            idle_timeout_s=settings.write_idle_timeout_seconds,
        )
        self.tenants = TenantGate(
            NamespaceAuthorizer(),  # its policy is read in start(), where a bad file stops the node cleanly
            NamespaceQuotas(settings.namespace_quota_bytes, settings.quota_overrides, lambda: self.servicer.storage),
            NamespaceRateLimits(settings.namespace_rate_limit, settings.rate_overrides),
        )
        self.servicer = KVCacheApi(storage, limits, zerocopy, WriteBudget(bounds), self.tenants)
        self.member_id = settings.member_id or f"cachenode-{uuid.uuid4().hex[:12]}"
        self.session: MemberSession | None = None
        self._load_watch: asyncio.Task[None] | None = None
        self._zerocopy: ZeroCopyApi | None = None
        self.dataplane: DataPlaneServer | None = None
        self.data_endpoint = ""  # host:port advertised as the `data-endpoint` label ("" when off)

    @property
    def storage(self) -> Storage | None:
        return self.servicer.storage

    def register(self, server: grpc.aio.Server) -> None:
        add_kvcache_to_server(self.servicer, server)

    def load(self) -> common_pb2.Load:
        storage = self.servicer.storage
        if storage is None:
            return common_pb2.Load()
        used = sum(s.used_bytes for s in storage.tier_stats()[:1])
        capacity = storage.capacity_bytes
        return common_pb2.Load(
            used_bytes=max(0, used), capacity_bytes=capacity, kv_usage=used / capacity if capacity else 0.0
        )

    async def start(self, address: str) -> None:
        authorizer = self.tenants.authorizer
        if self.settings.security_policy is not None and authorizer.policy is None:
            authorizer.policy = PolicyFile(self.settings.security_policy)  # before storage: no call is served yet
        if self.servicer.storage is None:
            self.servicer.storage = await build_storage(self.settings.storage)
        storage = self.servicer.storage
        log.info("storage ready", extra={"storage": storage.name, "capacity": storage.capacity_bytes})
        if self.servicer.zerocopy is None:  # zero-copy / RDMA sessions (services/cachenode/zerocopy)
            from kvmesh.services.cachenode.zerocopy.api import ZeroCopyApi

            self._zerocopy = ZeroCopyApi.for_node(
                storage,
                allocation_timeout_ms=self.settings.allocation_timeout_ms,
                requests=self.servicer.limits,
                max_sessions=self.settings.max_sessions,
                max_views=self.settings.max_views_per_session,
                max_pinned_fraction=self.settings.max_pinned_fraction,
                view_lease_ms=self.settings.view_lease_ms,
                control_socket=self.settings.local_control_socket,
                tenants=self.tenants,
            )
            if self._zerocopy is not None:
                await self._zerocopy.start()
                self.servicer.zerocopy = self._zerocopy
        labels = {"storage": storage.name}
        if self.settings.data_listen != "off":
            labels.update(await self._start_dataplane(address))
        if self.settings.standalone:
            return
        member = common_pb2.Member(
            id=self.member_id,
            role=common_pb2.ROLE_CACHENODE,
            address=address,
            zone=self.settings.zone,
            capacity_bytes=storage.capacity_bytes,
            labels=labels,
        )
        self.session = MemberSession(
            self.settings.metadata_addresses, member, ttl_seconds=self.settings.ttl_seconds, load_fn=self.load
        )
        await self.session.start()
        self._load_watch = asyncio.create_task(self._report_load_changes(), name="cachenode-load-watch")

    async def _start_dataplane(self, address: str) -> dict[str, str]:
        """Starts the bulk data plane (docs/dataplane.md); returns the labels that advertise it."""
        settings = self.settings
        grpc_host = address.rpartition(":")[0]
        if settings.data_listen == "auto":
            host, port = settings.listen.rpartition(":")[0], 0
        else:
            host, _, port_text = settings.data_listen.rpartition(":")
            port = int(port_text)
        # The service's own certificate and CA (--tls-*), rotating like the gRPC listener's.
        ssl_context = server_ssl_context(settings) if settings.server_enabled else None
        self.dataplane = DataPlaneServer(
            lambda: self.servicer.storage,
            self.servicer.limits,
            DataPlaneLimits(
                max_batch_keys=settings.data_max_batch_keys,
                max_frame_bytes=settings.data_max_frame_bytes,
                max_inflight_bytes=settings.data_max_inflight_bytes,
                stall_timeout_s=settings.data_stall_timeout_s,
                min_rate_bytes=settings.data_min_rate_bytes,
                idle_timeout_s=settings.data_idle_timeout_s,
            ),
            ssl_context,
            self.tenants,
        )
        bound = await self.dataplane.start(host.strip("[]"), port)
        # `auto` and wildcard hosts are reached where the gRPC address is (--advertise included).
        wildcard = settings.data_listen == "auto" or host in ("0.0.0.0", "::", "[::]", "")
        advertised_host = grpc_host if wildcard else host
        self.data_endpoint = f"{advertised_host}:{bound}"
        labels = {"data-endpoint": self.data_endpoint}
        if ssl_context is not None:
            labels["data-tls"] = "1"
        return labels

    def ready_fields(self) -> dict[str, str]:
        return {"data_endpoint": self.data_endpoint} if self.data_endpoint else {}

    async def _report_load_changes(self) -> None:
        """Sends a heartbeat early when used bytes moved by 1% of capacity (or 64 MiB), so the
        mesh sees fill levels within a second instead of one heartbeat interval later. One
        follow-up heartbeat goes out LOAD_SETTLE_SECONDS later, because the metadata service
        drops load updates that come faster than its per-member interval (1 s by default)."""
        last = self.load().used_bytes
        follow_up_at: float | None = None
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(LOAD_CHECK_SECONDS)
            if self.session is None:
                continue
            load = self.load()
            if abs(load.used_bytes - last) >= min(max(load.capacity_bytes // 100, 1), 64 * 1024**2):
                last = load.used_bytes
                self.session.nudge()
                follow_up_at = loop.time() + LOAD_SETTLE_SECONDS
            elif follow_up_at is not None and loop.time() >= follow_up_at:
                follow_up_at = None
                self.session.nudge()

    async def _stop_load_watch(self) -> None:
        task, self._load_watch = self._load_watch, None
        if task is not None:
            await cancel_and_wait(task)

    async def drain(self) -> None:
        if self.dataplane is not None:
            self.dataplane.stop_accepting()
        if self._zerocopy is not None:  # data-path streams never end by themselves: end them now
            self._zerocopy.drain()
        await self._stop_load_watch()
        if self.session is not None:
            await self.session.close(deregister=True)
            self.session = None

    async def close(self) -> None:
        await self._stop_load_watch()
        if self.session is not None:
            await self.session.close(deregister=False)
            self.session = None
        if self._zerocopy is not None:
            await self._zerocopy.close()
            self._zerocopy = None
        if self.dataplane is not None:  # before the storage: open writes are aborted into it
            await self.dataplane.close()
            self.dataplane = None
        await self.tenants.close()
        storage, self.servicer.storage = self.servicer.storage, None
        if storage is not None:
            await storage.close()
