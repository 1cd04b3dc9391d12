"""Checks that a running mesh (whatever started it) formed and serves: membership, a route, cache round trips.

Each check dials with `tls` (a client certificate from the deployment's CA: compose and Kubernetes
run the mesh on mutual TLS) or in plaintext when it is None."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

import grpc

from kvmesh.security.tls import ClientTLS
from kvmesh.tools.testing.polling import eventually_sync
from kvmesh.v1 import (
    cachenode_pb2,
    cachenode_pb2_grpc,
    common_pb2,
    metadata_pb2,
    metadata_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30.0) -> T:
    """The shared polling helper, with gRPC errors counting as not yet (deploys come up slowly)."""
    return eventually_sync(check, timeout=timeout, interval=0.3, what=what, retry_on=grpc.RpcError)


def channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    """A blocking channel to `address`, with `tls` when given."""
    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials(), options=tls.channel_options())


def members(metadata: str, role: common_pb2.Role.ValueType, tls: ClientTLS | None = None) -> dict[str, str]:
    """member id → advertised address, as one metadata replica lists them."""
    with channel(metadata, tls) as ch:
        reply = metadata_pb2_grpc.MembershipStub(ch).List(metadata_pb2.ListRequest(role=role), timeout=5)
    return {m.id: m.address for m in reply.members}


def expect_members(metadata: str, cachenodes: Mapping[str, str], engines: Mapping[str, str],
                   tls: ClientTLS | None = None) -> None:
    wait_for(lambda: members(metadata, common_pb2.ROLE_CACHENODE, tls) == dict(cachenodes),
             f"cache nodes via {metadata}")
    wait_for(lambda: members(metadata, common_pb2.ROLE_ENGINE, tls) == dict(engines), f"engines via {metadata}")


def expect_route(router: str, engines: Mapping[str, str], model: str = "llama-3-8b",
                 tls: ClientTLS | None = None) -> router_pb2.RouteResponse:
    """A 2,048-token prompt is routed to one of the engines, and released."""
    with channel(router, tls) as ch:
        stub = router_pb2_grpc.RouterStub(ch)
        request = router_pb2.RouteRequest(request_id="deploy-check", model=model,
                                          tokens=router_pb2.TokenIds(ids=list(range(1, 2049))))
        decision = wait_for(lambda: stub.Route(request, timeout=5), f"a route from {router}")
        assert decision.member_id in engines and decision.address == engines[decision.member_id], decision
        assert decision.total_blocks > 0
        stub.Release(router_pb2.ReleaseRequest(request_id="deploy-check"), timeout=5)
    return decision


def expect_round_trip(address: str, name: str, min_tiers: int = 1, tls: ClientTLS | None = None) -> None:
    """A 256 KiB value put and read back whole; the node reports at least `min_tiers` engines."""
    value = bytes(range(256)) * 1024
    key = f"deploy-{name}".encode().ljust(16, b".")[:64]
    with channel(address, tls) as ch:
        cache = cachenode_pb2_grpc.KVCacheStub(ch)
        cache.Put(cachenode_pb2.PutRequest(namespace="deploy", key=key, value=value), timeout=10)
        got = cache.Get(cachenode_pb2.GetRequest(namespace="deploy", key=key), timeout=10)
        assert got.found and got.value == value, name
        tiers = [e.tier for e in cache.Stats(cachenode_pb2.StatsRequest(), timeout=10).engines]
    assert len(tiers) >= min_tiers, f"{name}: expected {min_tiers} tiers, got {tiers}"


def expect_plaintext_refused(address: str) -> None:
    """A plaintext client gets nowhere: the port speaks TLS only."""
    try:
        members(address, common_pb2.ROLE_UNSPECIFIED)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
    else:
        raise AssertionError(f"{address} answered a plaintext client")
