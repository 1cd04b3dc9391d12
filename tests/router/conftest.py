"""An in-process mesh for router tests: a real metadata service (memory://) and a router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
import pytest

from kvmesh.membership import MemberSession
from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime
from kvmesh.v1 import router_pb2_grpc
from services.metadata.service import MetadataService
from services.metadata.settings import MetadataSettings
from services.router.service import RouterService
from tests.router.helpers import member, settings


@dataclass
class Mesh:
    metadata_address: str
    router_address: str
    service: RouterService
    stub: router_pb2_grpc.RouterStub
    channel: grpc.aio.Channel
    sessions: dict[str, MemberSession] = field(default_factory=dict)

    async def join(self, member_id: str, model: str = "", port: int = 9000, running: int = 0) -> MemberSession:
        m = member(member_id, model, running, port=port)
        session = MemberSession([self.metadata_address], m, ttl_seconds=5, load_fn=lambda: m.load)
        await session.start()
        await session.wait_registered(10)
        self.sessions[member_id] = session
        return session

    async def leave(self, member_id: str) -> None:
        await self.sessions.pop(member_id).close(deregister=True)

    async def wait_members(self, predicate: Callable[[set[str]], bool], timeout: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not predicate(set(self.service.core.pods.by_id)):
            if loop.time() > deadline:
                raise AssertionError(f"router members: {sorted(self.service.core.pods.by_id)}")
            await asyncio.sleep(0.01)


MeshFactory = Callable[..., "asyncio.Future[Mesh]"]


@pytest.fixture
async def mesh_factory() -> AsyncIterator[Callable[..., object]]:
    """Starts metadata + router in process; stops both (and every engine session) afterwards."""
    runtimes: list[ServerRuntime] = []
    meshes: list[Mesh] = []

    async def start(**router_settings: object) -> Mesh:
        md_settings = MetadataSettings(listen="127.0.0.1:0", backend="memory://?sweep_ms=50", grace_seconds=0.5)
        md = ServerRuntime(MetadataService(md_settings), md_settings)
        runtimes.append(md)
        md_address = await md.start()
        router_settings.setdefault("grace_seconds", 0.5)
        rs = settings(listen="127.0.0.1:0", metadata=md_address, **router_settings)
        service = RouterService(rs)
        rt = ServerRuntime(service, rs)
        runtimes.append(rt)
        address = await rt.start()
        channel = open_channel(address)
        mesh = Mesh(md_address, address, service, router_pb2_grpc.RouterStub(channel), channel)
        meshes.append(mesh)
        return mesh

    yield start
    for mesh in meshes:
        for session in mesh.sessions.values():
            await session.close()
        await mesh.channel.close()
    for rt in reversed(runtimes):
        await rt.stop()
