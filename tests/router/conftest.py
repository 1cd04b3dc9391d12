"""An in-process mesh for router tests: a real metadata service (memory://) and a router."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest

from kvmesh.membership import MemberSession
from kvmesh.services.router.service import RouterService
from kvmesh.tools.testing.mesh import MeshHandle, local_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import router_pb2_grpc
from tests.router.helpers import member


@dataclass
class Mesh:
    """The shared mesh handle plus the router tests' engine sessions (registered from the test)."""

    handle: MeshHandle
    sessions: dict[str, MemberSession] = field(default_factory=dict)

    @property
    def metadata_address(self) -> str:
        return self.handle.metadata_address

    @property
    def router_address(self) -> str:
        return self.handle.router_address

    @property
    def service(self) -> RouterService:
        service: RouterService = self.handle.of_role("router")[0].service
        return service

    @property
    def stub(self) -> router_pb2_grpc.RouterStub:
        return self.handle.router_stub()

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
        """Polls the router's own member table (not the metadata service's) until `predicate` holds."""
        pods = self.service.core.pods
        await eventually(lambda: predicate(set(pods.by_id) - set(pods.departed)), timeout=timeout, interval=0.01,
                         what="the router's members")


@pytest.fixture
async def mesh_factory() -> AsyncIterator[Callable[..., object]]:
    """Starts metadata + router in process; stops both (and every engine session) afterwards."""
    meshes: list[Mesh] = []
    async with contextlib.AsyncExitStack() as stack:

        async def start(**router_settings: object) -> Mesh:
            router_settings.setdefault("random_seed", 7)
            handle = await stack.enter_async_context(
                local_mesh(routers=1, router_settings=router_settings, timeout=None)
            )
            mesh = Mesh(handle)
            meshes.append(mesh)
            return mesh

        try:
            yield start
        finally:
            for mesh in meshes:
                for session in mesh.sessions.values():
                    await session.close()
