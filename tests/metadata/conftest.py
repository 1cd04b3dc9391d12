"""Fixtures for the metadata service: an in-process service per backend, on real servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime
from kvmesh.services.metadata.service import MetadataService
from kvmesh.services.metadata.settings import MetadataSettings
from kvmesh.tools.testing.mesh import local_mesh
from kvmesh.v1 import common_pb2, metadata_pb2_grpc

BACKENDS = ["memory", "etcd", "redis"]


def backend_uri(request: pytest.FixtureRequest, name: str) -> str:
    """A URI for `name` on the session's real server, isolated by a fresh key prefix."""
    tag = uuid.uuid4().hex[:12]
    if name == "memory":
        return "memory://?sweep_ms=50"
    server = request.getfixturevalue(name)
    if name == "etcd":
        return f"etcd://{server.address}?prefix=/t-{tag}"
    return f"redis://{server.address}/0?prefix=t-{tag}&sweep_ms=50"


@dataclass
class MetadataClient:
    """One in-process metadata service and stubs on a channel to it."""

    address: str
    backend: str
    channel: grpc.aio.Channel
    membership: metadata_pb2_grpc.MembershipStub
    kv: metadata_pb2_grpc.MetadataStub


async def start_metadata(uri: str, **overrides: object) -> tuple[ServerRuntime, MetadataClient]:
    settings = MetadataSettings(listen="127.0.0.1:0", backend=uri, grace_seconds=0.5, **overrides)  # type: ignore[arg-type]
    runtime = ServerRuntime(MetadataService(settings), settings)
    address = await runtime.start()
    channel = open_channel(address)
    client = MetadataClient(
        address, uri.split(":", 1)[0], channel,
        metadata_pb2_grpc.MembershipStub(channel), metadata_pb2_grpc.MetadataStub(channel),
    )
    return runtime, client


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each contract test runs once per backend, each time under a fresh prefix."""
    return backend_uri(request, request.param)


@pytest.fixture
async def md(backend: str) -> AsyncIterator[MetadataClient]:
    """The shared mesh with only a metadata service (its exit waits for RPC handlers to unwind)."""
    async with local_mesh(metadata_backend=backend, timeout=None) as mesh:
        channel = mesh.channel(mesh.metadata_address)
        yield MetadataClient(mesh.metadata_address, backend.split(":", 1)[0], channel, mesh.membership(), mesh.kv())


async def stop_metadata(runtime: ServerRuntime, timeout: float = 3.0) -> None:
    """Stops the service and waits for its cancelled handlers to unwind (a blocked XREAD takes a moment)."""
    await runtime.stop()
    deadline = asyncio.get_running_loop().time() + timeout
    while any(t.get_name().startswith("HandleExceptions") and not t.done() for t in asyncio.all_tasks()):
        assert asyncio.get_running_loop().time() < deadline, "RPC handlers still running after stop"
        await asyncio.sleep(0.01)


def member(member_id: str, role: int = common_pb2.ROLE_ENGINE, port: int = 9000, **fields: object
           ) -> common_pb2.Member:
    return common_pb2.Member(id=member_id, role=role, address=f"127.0.0.1:{port}", **fields)  # type: ignore[arg-type]
