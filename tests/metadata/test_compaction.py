"""When a backend no longer retains the events after a revision: SNAPSHOT for membership,
OUT_OF_RANGE for a KV watch, on every backend (memory/Redis trim their logs, etcd compacts)."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh.tools.testing.mesh import local_mesh
from kvmesh.v1 import metadata_pb2
from tests.metadata.conftest import MetadataClient, member, metadata_client
from tests.metadata.streams import StreamReader


@pytest.fixture(params=["memory", "redis", "etcd"])
async def small(request: pytest.FixtureRequest) -> AsyncIterator[tuple[MetadataClient, str, str]]:
    """A service whose backend keeps only the last 64 revisions (etcd: compacted by the test)."""
    tag = uuid.uuid4().hex[:12]
    server_address = ""
    if request.param == "memory":
        uri = "memory://?retain=64"
    elif request.param == "redis":
        server_address = request.getfixturevalue("redis").address
        uri = f"redis://{server_address}/0?prefix=c-{tag}&retain=64"
    else:
        server_address = request.getfixturevalue("etcd").address
        uri = f"etcd://{server_address}?prefix=/c-{tag}"
    async with local_mesh(metadata_backend=uri, timeout=None) as mesh:
        yield metadata_client(mesh, uri), request.param, server_address


def compact_etcd(address: str, revision: int) -> None:
    body = json.dumps({"revision": revision, "physical": True}).encode()
    req = urllib.request.Request(f"http://{address}/v3/kv/compaction", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


async def test_old_revisions_give_snapshot_or_out_of_range(small: tuple[MetadataClient, str, str]) -> None:
    md, backend, server_address = small
    reg = await md.membership.Register(metadata_pb2.RegisterRequest(member=member("e1"), ttl_seconds=30))
    first = (await md.kv.Put(metadata_pb2.PutKeyRequest(key="k", value=b"0"))).revision
    last = first
    for i in range(200):
        last = (await md.kv.Put(metadata_pb2.PutKeyRequest(key="k", value=str(i).encode()))).revision
    if backend == "etcd":
        compact_etcd(server_address, last)

    kv_watch = StreamReader[metadata_pb2.KeyEvent](
        md.kv.Watch(metadata_pb2.WatchKeysRequest(prefix="k", start_revision=first)))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await kv_watch.next()
        assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    finally:
        await kv_watch.close()

    members = StreamReader[metadata_pb2.MembershipEvent](
        md.membership.Watch(metadata_pb2.WatchRequest(start_revision=reg.revision)))
    try:
        snap = await members.next()
        assert snap.type == metadata_pb2.SNAPSHOT
        assert [m.id for m in snap.members] == ["e1"]
    finally:
        await members.close()

    # Recent revisions are still replayed exactly.
    recent = StreamReader[metadata_pb2.KeyEvent](
        md.kv.Watch(metadata_pb2.WatchKeysRequest(prefix="k", start_revision=last - 1)))
    try:
        event = await recent.next()
        assert (event.revision, event.kv.value) == (last, b"199")
        assert await recent.nothing_within(0.2)
    finally:
        await recent.close()
