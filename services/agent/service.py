"""The agent as a kvmesh `Service`: registers the engine while it is healthy, reports its load.

One loop, every `--poll-interval-seconds`: `/health` (in a thread: blocking HTTP); while the
engine answers, a `MemberSession` holds an ROLE_ENGINE lease for it (OpenAI address, model,
KV-event labels) and each KeepAlive carries the load last read from `/metrics`. After
`--unhealthy-after` failed checks in a row the member deregisters at once (LEAVE now, not at
lease expiry); when the engine answers again it registers again. The agent serves only gRPC
health on `--listen`.
"""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc

from kvmesh.membership import MemberSession
from kvmesh.runtime.server import Service
from kvmesh.services.agent import engine
from kvmesh.services.agent.settings import AgentSettings
from kvmesh.tasks import cancel_and_wait
from kvmesh.v1 import common_pb2

log = logging.getLogger("kvmesh.agent")

EVENTS_LABEL = "kv-events"
REPLAY_LABEL = "kv-events-replay"


class AgentService(Service):
    name = "agent"
    service_names = ()

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.session: MemberSession | None = None
        self.load = common_pb2.Load()
        self.model = settings.model
        self._task: asyncio.Task[None] | None = None

    def register(self, server: grpc.aio.Server) -> None:
        """Nothing but health (served by the runtime)."""

    async def start(self, address: str) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="agent")

    def member(self) -> common_pb2.Member:
        s = self.settings
        labels = {"engine-url": s.engine_url}
        if s.kv_events:
            labels[EVENTS_LABEL] = s.kv_events
        if s.kv_events_replay:
            labels[REPLAY_LABEL] = s.kv_events_replay
        engine_address = s.advertised_engine
        return common_pb2.Member(
            id=s.member_id or f"engine-{socket.gethostname()}-{engine_address.rpartition(':')[2]}",
            role=common_pb2.ROLE_ENGINE,
            address=engine_address,
            model=self.model,
            zone=s.zone,
            labels=labels,
        )

    async def _run(self) -> None:
        s = self.settings
        failures = 0
        while True:
            if await asyncio.to_thread(engine.healthy, s.engine_url, s.http_timeout_seconds):
                failures = 0
                await self._engine_up()
            else:
                failures += 1
                if failures >= s.unhealthy_after and self.session is not None:
                    log.warning("engine %s stopped answering /health: leaving the mesh", s.engine_url)
                    await self._leave()
            await asyncio.sleep(s.poll_interval_seconds)

    async def _engine_up(self) -> None:
        s = self.settings
        try:
            self.load = await asyncio.to_thread(engine.read_load, s.engine_url, s.http_timeout_seconds)
        except (OSError, ValueError):
            log.debug("cannot read %s/metrics", s.engine_url, exc_info=True)
        if self.session is not None:
            return
        if not self.model:
            try:
                self.model = await asyncio.to_thread(engine.served_model, s.engine_url, s.http_timeout_seconds)
            except (OSError, ValueError):
                log.warning("cannot read %s/v1/models", s.engine_url, exc_info=True)
                return
        member = self.member()
        self.session = MemberSession(s.metadata_addresses, member, s.ttl_seconds, load_fn=lambda: self.load)
        await self.session.start()
        log.info("engine %s joins the mesh as %s (model %r)", s.engine_url, member.id, member.model)

    async def _leave(self) -> None:
        if self.session is not None:
            await self.session.close(deregister=True)
            self.session = None

    async def drain(self) -> None:
        await self._leave()

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        await self._leave()
