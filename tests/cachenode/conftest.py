"""An in-process cache node (real gRPC server on loopback) for servicer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime
from kvmesh.v1 import cachenode_pb2_grpc
from services.cachenode.config import CacheNodeSettings
from services.cachenode.service import CacheNodeService
from tests.cachenode.servers import redis_cluster, redis_tls_server, vineyardd


@asynccontextmanager
async def running_node(**settings: Any) -> AsyncIterator[tuple[CacheNodeService, cachenode_pb2_grpc.KVCacheStub]]:
    """A cache node on a free port (not registered anywhere) and a stub talking to it."""
    settings.setdefault("standalone", True)
    settings.setdefault("engine", "memory://?capacity=64MiB")
    service = CacheNodeService(CacheNodeSettings(listen="127.0.0.1:0", **settings))
    runtime = ServerRuntime(service, service.settings)
    address = await runtime.start()
    channel = open_channel(address)
    try:
        yield service, cachenode_pb2_grpc.KVCacheStub(channel)
    finally:
        await channel.close()
        await runtime.stop()


NodeFactory = Callable[..., Any]


@pytest.fixture
def node() -> NodeFactory:
    """`async with node(engine=..., max_value_bytes=...) as (service, stub):`."""
    return running_node


# -- real servers for the engine contract suite (one of each per test session) ----------

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
