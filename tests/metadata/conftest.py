"""Fixtures for the metadata service: the shared local mesh per backend, on real servers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from kvmesh.tools.testing.mesh import MeshHandle, local_mesh
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
    """The mesh's metadata service and stubs on its channel."""

    address: str
    backend: str
    channel: grpc.aio.Channel
    membership: metadata_pb2_grpc.MembershipStub
    kv: metadata_pb2_grpc.MetadataStub


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Each contract test runs once per backend, each time under a fresh prefix."""
    return backend_uri(request, request.param)


@pytest.fixture
async def md(backend: str) -> AsyncIterator[MetadataClient]:
    """The shared mesh with only a metadata service (its exit waits for RPC handlers to unwind)."""
    async with local_mesh(metadata_backend=backend, timeout=None) as mesh:
        yield metadata_client(mesh, backend)


def metadata_client(mesh: MeshHandle, backend: str) -> MetadataClient:
    """The mesh's metadata service as a `MetadataClient` (the mesh owns and closes the channel)."""
    channel = mesh.channel(mesh.metadata_address)
    return MetadataClient(mesh.metadata_address, backend.split(":", 1)[0], channel, mesh.membership(), mesh.kv())


def member(member_id: str, role: int = common_pb2.ROLE_ENGINE, port: int = 9000, **fields: object
           ) -> common_pb2.Member:
    return common_pb2.Member(id=member_id, role=role, address=f"127.0.0.1:{port}", **fields)  # type: ignore[arg-type]
