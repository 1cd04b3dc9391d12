"""An in-process cache node (real gRPC server on loopback) for servicer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from kvmesh.services.cachenode.service import CacheNodeService
from kvmesh.tools.testing.mesh import local_mesh
from kvmesh.v1 import cachenode_pb2_grpc
from tests.cachenode.servers import redis_cluster, redis_tls_server, vineyardd


@asynccontextmanager
async def running_node(**settings: Any) -> AsyncIterator[tuple[CacheNodeService, cachenode_pb2_grpc.KVCacheStub]]:
    """A cache node on a free port (not registered anywhere) and a stub talking to it."""
    settings.setdefault("standalone", True)
    async with local_mesh(metadata=0, cachenodes=1, cachenode_settings=settings, grace_seconds=5) as mesh:
        yield mesh.of_role("cachenode")[0].service, mesh.kvcache()


NodeFactory = Callable[..., Any]


@pytest.fixture
def node() -> NodeFactory:
    """`async with node(storage=..., max_value_bytes=...) as (service, stub):`."""
    return running_node


# -- real servers for the storage contract suite (one of each per test session) ----------

REDIS_PASSWORD = "kvmesh-test-secret"


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Path]]:
    with redis_tls_server(tmp_path_factory.mktemp("redis-tls"), REDIS_PASSWORD) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    with redis_cluster(tmp_path_factory.mktemp("redis-cluster")) as ports:
        yield ports


@pytest.fixture(scope="session")
def vineyard_socket(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with vineyardd(tmp_path_factory.mktemp("vineyard")) as sock:
        yield sock
