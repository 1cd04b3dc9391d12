"""An in-process cache node (real gRPC server on loopback) for servicer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime
from kvmesh.v1 import cachenode_pb2_grpc
from services.cachenode.config import CacheNodeSettings
from services.cachenode.service import CacheNodeService


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


def code_of(exc: grpc.aio.AioRpcError) -> grpc.StatusCode:
    return exc.code()
