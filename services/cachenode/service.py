"""The cache node as a kvmesh `Service`: engine lifecycle and membership.

The engine is built once the server listens (engine URIs are validated by then: a bad one
stops the node with a clear message), then the node registers as ROLE_CACHENODE with its
capacity and reports used bytes with every heartbeat. On shutdown it deregisters before the
server stops, and closes the engine last.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import TYPE_CHECKING

import grpc

from kvmesh.membership import MemberSession
from kvmesh.runtime.server import Service
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import cachenode_pb2, common_pb2
from services.cachenode.config import CacheNodeSettings
from services.cachenode.engines.base import Engine
from services.cachenode.engines.registry import build_engine
from services.cachenode.handlers import add_kvcache_to_server
from services.cachenode.servicer import DataPath, KVCacheServicer, Limits

if TYPE_CHECKING:
    from services.cachenode.datapath.service import DataPath as SessionDataPath

log = logging.getLogger("kvmesh.cachenode")

LOAD_CHECK_SECONDS = 0.5
LOAD_SETTLE_SECONDS = 1.5


class CacheNodeService(Service):
    """A KVCache server over one (possibly tiered) engine."""

    name = "cachenode"
    service_names = (cachenode_pb2.DESCRIPTOR.services_by_name["KVCache"].full_name,)

    def __init__(
        self, settings: CacheNodeSettings, engine: Engine | None = None, datapath: DataPath | None = None
    ) -> None:
        self.settings = settings
        limits = Limits(
            max_key_bytes=settings.max_key_bytes,
            max_value_bytes=settings.max_value_bytes,
            chunk_bytes=min(settings.chunk_bytes, settings.max_message_bytes - 64 * 1024),
            namespaces=settings.allowed_namespaces,
        )
        self.servicer = KVCacheServicer(engine, limits, datapath)
        self.member_id = settings.member_id or f"cachenode-{uuid.uuid4().hex[:12]}"
        self.session: MemberSession | None = None
        self._load_watch: asyncio.Task[None] | None = None
        self._datapath: SessionDataPath | None = None

    @property
    def engine(self) -> Engine | None:
        return self.servicer.engine

    def register(self, server: grpc.aio.Server) -> None:
        add_kvcache_to_server(self.servicer, server)

    def load(self) -> common_pb2.Load:
        engine = self.servicer.engine
        if engine is None:
            return common_pb2.Load()
        used = sum(s.used_bytes for s in engine.tier_stats()[:1])
        capacity = engine.capacity_bytes
        return common_pb2.Load(
            used_bytes=max(0, used), capacity_bytes=capacity, kv_usage=used / capacity if capacity else 0.0
        )

    async def start(self, address: str) -> None:
        if self.servicer.engine is None:
            self.servicer.engine = await build_engine(self.settings.engine)
        engine = self.servicer.engine
        log.info("engine ready", extra={"engine": engine.name, "capacity": engine.capacity_bytes})
        if self.servicer.datapath is None:  # zero-copy / RDMA sessions (services/cachenode/datapath)
            from services.cachenode.datapath.service import DataPath as SessionDataPath

            self._datapath = SessionDataPath.for_node(
                engine,
                allocation_timeout_ms=self.settings.allocation_timeout_ms,
                max_key_bytes=self.settings.max_key_bytes,
                max_value_bytes=self.settings.max_value_bytes,
                namespaces=self.settings.allowed_namespaces,
            )
            if self._datapath is not None:
                await self._datapath.start()
                self.servicer.datapath = self._datapath
        if self.settings.standalone:
            return
        member = common_pb2.Member(
            id=self.member_id,
            role=common_pb2.ROLE_CACHENODE,
            address=address,
            zone=self.settings.zone,
            capacity_bytes=engine.capacity_bytes,
            labels={"engine": engine.name},
        )
        self.session = MemberSession(
            self.settings.metadata_addresses, member, ttl_seconds=self.settings.ttl_seconds, load_fn=self.load
        )
        await self.session.start()
        self._load_watch = asyncio.create_task(self._report_load_changes(), name="cachenode-load-watch")

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
        if self._datapath is not None:  # data-path streams never end by themselves: end them now
            self._datapath.drain()
        await self._stop_load_watch()
        if self.session is not None:
            await self.session.close(deregister=True)
            self.session = None

    async def close(self) -> None:
        await self._stop_load_watch()
        if self.session is not None:
            await self.session.close(deregister=False)
            self.session = None
        if self._datapath is not None:
            await self._datapath.close()
            self._datapath = None
        engine, self.servicer.engine = self.servicer.engine, None
        if engine is not None:
            await engine.close()
