"""The router as a kvmesh `Service`: servicer, membership follower, sweeper, own registration.

`update_pod_set` is `RouterCore.update_pods`, called by `MembershipWatcher` for every diff of
`Watch(ROLE_ENGINE)` (including the diff computed after a reconnect's snapshot); the watcher
reconnects with backoff and resumes from its last revision. The call is synchronous, so a
change is applied whole between two routing decisions.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2

from kvmesh.membership import MemberSession, MembershipChange, MembershipWatcher
from kvmesh.runtime.server import Service
from kvmesh.services.router.access import RouterAccess
from kvmesh.services.router.core import RouterCore
from kvmesh.services.router.kv_events.subscriber import KvEventSubscriber
from kvmesh.services.router.metrics import register_router_metrics
from kvmesh.services.router.router_api import RouterApi
from kvmesh.services.router.settings import RouterSettings
from kvmesh.services.router.tokenize import Tokenizers
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import common_pb2, router_pb2_grpc

if TYPE_CHECKING:
    from kvmesh.services.router.ext_proc.server import ExtProcServer

log = logging.getLogger("kvmesh.router")

WARM_HEALTH_NAME = "kvmesh.v1.Router.warm"  # grpc.health.v1 name: SERVING once the index is warm


class RouterService(Service):
    name = "router"
    service_names = ("kvmesh.v1.Router",)

    def __init__(self, settings: RouterSettings, follow_membership: bool = True) -> None:
        self.settings = settings
        self.core = RouterCore(settings.policy, settings)
        tokenizers = Tokenizers(settings.tokenizer_paths) if settings.tokenizer else None
        self.kv_events = KvEventSubscriber(self.core, settings)
        self.access = RouterAccess(settings.security_policy)
        self.servicer = RouterApi(self.core, tokenizers, self.kv_events, self.access)
        register_router_metrics(self.core)
        self._follow = follow_membership
        self.watcher: MembershipWatcher | None = None
        self.session: MemberSession | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._warm_task: asyncio.Task[None] | None = None
        self.ext_proc: ExtProcServer | None = None
        if settings.ext_proc_listen:
            from kvmesh.services.router.ext_proc.server import ExtProcServer  # only with the flag: imports xds-protos

            self.ext_proc = ExtProcServer(self.core, settings, self.access)

    def register(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)

    async def start(self, address: str) -> None:
        if self._sweeper is not None:
            return
        s = self.settings
        await self.kv_events.start()
        if self._follow:
            self.watcher = MembershipWatcher(s.metadata_addresses, common_pb2.ROLE_ENGINE, self.update_pod_set)
            watcher = self.watcher
            self.core.membership_stale = lambda: watcher.stale
            await self.watcher.start()
            if s.register_self:
                member = common_pb2.Member(
                    id=s.member_id or f"router-{socket.gethostname()}-{address.rpartition(':')[2]}",
                    role=common_pb2.ROLE_ROUTER,
                    address=address,
                    zone=s.zone,
                )
                self.session = MemberSession(s.metadata_addresses, member, s.ttl_seconds)
                await self.session.start()
        self._sweeper = asyncio.create_task(self._sweep(), name="router-sweeper")
        if self.ext_proc is not None:
            await self.ext_proc.start()

    def update_pod_set(self, change: MembershipChange) -> None:
        """One membership diff: the tree first, then the KV-event subscriptions (both synchronous)."""
        self.core.update_pods(change)
        self.kv_events.update_pods(change)

    async def health_ready(self, servicer: health.aio.HealthServicer) -> None:
        """Readiness of the index: `kvmesh.v1.Router.warm` is SERVING once the KV-event view is warm."""
        self._warm_task = asyncio.create_task(self._publish_warm(servicer), name="router-warm")

    async def _publish_warm(self, servicer: health.aio.HealthServicer) -> None:
        shown: bool | None = None
        while True:
            warm = self.kv_events.warm()
            if warm != shown:
                status = health_pb2.HealthCheckResponse.SERVING if warm else health_pb2.HealthCheckResponse.NOT_SERVING
                await servicer.set(WARM_HEALTH_NAME, status)
                shown = warm
            await asyncio.sleep(self.settings.warm_check_interval_seconds)

    async def _sweep(self) -> None:
        """Expires approximate blocks and never-released requests, one pod per loop turn."""
        core = self.core
        while True:
            await asyncio.sleep(self.settings.sweep_interval_seconds)
            core.sweep_requests()
            core.expire_departed()
            for member_id in list(core.pods.by_id):
                core.expire_pod(member_id)
                await asyncio.sleep(0)

    async def drain(self) -> None:
        if self.ext_proc is not None:
            await self.ext_proc.drain()
        if self.session is not None:
            await self.session.close(deregister=True)
            self.session = None

    async def close(self) -> None:
        await self.drain()
        if self.ext_proc is not None:
            await self.ext_proc.close(self.settings.grace_seconds)
        if self._sweeper is not None:
            await cancel_and_wait(self._sweeper)
            self._sweeper = None
        if self._warm_task is not None:
            await cancel_and_wait(self._warm_task)
            self._warm_task = None
        if self.watcher is not None:
            await self.watcher.close()
            self.watcher = None
        await self.kv_events.close()
