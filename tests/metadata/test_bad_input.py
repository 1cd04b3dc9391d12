"""Bad input gets a clear status, changes nothing, and the service keeps serving."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from kvmesh.tools.testing.mesh import local_mesh
from kvmesh.tools.testing.status import status_of
from kvmesh.v1 import common_pb2, metadata_pb2
from tests.metadata.conftest import MetadataClient, member, metadata_client
from tests.metadata.streams import StreamReader

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
async def mem() -> AsyncIterator[MetadataClient]:
    backend = "memory://?retain=64"
    async with local_mesh(metadata_backend=backend, metadata_settings={"max_value_bytes": 1024, "max_key_bytes": 64},
                          timeout=None) as mesh:
        yield metadata_client(mesh, backend)



async def stream_status(call: object) -> grpc.StatusCode:
    reader = StreamReader[object](call)
    try:
        await reader.next(5)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await reader.close()
    return grpc.StatusCode.OK


@pytest.mark.parametrize(
    ("bad", "ttl"),
    [
        (member(""), 10),
        (member("x" * 254), 10),
        (member("a/b"), 10),
        (member("has space"), 10),
        (member("ok", role=7), 10),  # an enum value no version of the contract defines
        (member("ok", role=common_pb2.ROLE_UNSPECIFIED), 10),
        (common_pb2.Member(id="ok", role=common_pb2.ROLE_ENGINE, address="no-port"), 10),
        (common_pb2.Member(id="ok", role=common_pb2.ROLE_ENGINE, address="h:99999"), 10),
        (member("ok", labels={"k": "v" * 70_000}), 10),
        (member("ok", labels={f"l{i}": "v" for i in range(65)}), 10),  # over --max-labels 64
        (member("ok", labels={"k": "v" * 1100}), 10),  # over --max-label-bytes 1024
        (member("ok", labels={f"l{i}": "v" * 1000 for i in range(17)}), 10),  # over --max-member-bytes 16 KiB
        (member(".."), 10),
        (member("."), 10),
        (common_pb2.Member(id="ok", role=common_pb2.ROLE_ENGINE, address="a:b:c:1"), 10),
        (common_pb2.Member(id="ok", role=common_pb2.ROLE_ENGINE, address="h/x:80"), 10),
        (common_pb2.Member(id="ok", role=common_pb2.ROLE_ENGINE, address="h" * 300 + ":80"), 10),
        (member("ok"), 0),
        (member("ok"), 3601),
        (member("ok"), 4_000_000_000),
    ],
)
async def test_register_rejects_bad_members_and_ttls(mem: MetadataClient, bad: common_pb2.Member, ttl: int) -> None:
    request = metadata_pb2.RegisterRequest(member=bad, ttl_seconds=ttl)
    assert await status_of(mem.membership.Register(request)) == INVALID
    assert (await mem.membership.List(metadata_pb2.ListRequest())).members == []
    ok = await mem.membership.Register(metadata_pb2.RegisterRequest(member=member("fine"), ttl_seconds=10))
    assert ok.lease_id > 0  # still serving


async def test_register_accepts_ipv6_and_dns_addresses(mem: MetadataClient) -> None:
    for i, address in enumerate(["[::1]:7000", "node-1.example.internal:7000", "10.0.0.1:1"]):
        good = common_pb2.Member(id=f"m{i}", role=common_pb2.ROLE_ENGINE, address=address)
        assert (await mem.membership.Register(metadata_pb2.RegisterRequest(member=good, ttl_seconds=10))).lease_id


async def test_leases_roles_and_revisions(mem: MetadataClient) -> None:
    m = mem.membership
    assert await status_of(m.Deregister(metadata_pb2.DeregisterRequest(lease_id=0))) == INVALID
    assert await status_of(m.Deregister(metadata_pb2.DeregisterRequest(lease_id=-5))) == INVALID
    unknown = m.Deregister(metadata_pb2.DeregisterRequest(lease_id=987654321))
    assert await status_of(unknown) == grpc.StatusCode.NOT_FOUND
    assert await status_of(m.List(metadata_pb2.ListRequest(role=9))) == INVALID  # type: ignore[arg-type]
    assert await stream_status(m.Watch(metadata_pb2.WatchRequest(role=9))) == INVALID  # type: ignore[arg-type]
    assert await stream_status(m.Watch(metadata_pb2.WatchRequest(start_revision=-1))) == INVALID
    call = m.KeepAlive()
    await call.write(metadata_pb2.KeepAliveRequest(lease_id=0))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == INVALID
    assert (await m.List(metadata_pb2.ListRequest())).members == []


async def test_keyvalue_bad_input(mem: MetadataClient) -> None:
    kv = mem.kv
    assert await status_of(kv.Put(metadata_pb2.PutKeyRequest(key="", value=b"v"))) == INVALID
    assert await status_of(kv.Put(metadata_pb2.PutKeyRequest(key="k" * 65, value=b"v"))) == INVALID
    assert await status_of(kv.Put(metadata_pb2.PutKeyRequest(key="a\nb", value=b"v"))) == INVALID
    assert await status_of(kv.Get(metadata_pb2.GetKeyRequest(key=""))) == INVALID
    assert await status_of(kv.Delete(metadata_pb2.DeleteKeyRequest(key=""))) == INVALID
    assert await status_of(kv.Range(metadata_pb2.RangeRequest(prefix="p" * 65))) == INVALID
    too_big = kv.Put(metadata_pb2.PutKeyRequest(key="big", value=b"x" * 1025))
    assert await status_of(too_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    cas_big = kv.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(key="big", value=b"x" * 1025))
    assert await status_of(cas_big) == grpc.StatusCode.RESOURCE_EXHAUSTED
    cas_neg = kv.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(key="k", expected_mod_revision=-1))
    assert await status_of(cas_neg) == INVALID
    no_lease = kv.Put(metadata_pb2.PutKeyRequest(key="k", value=b"v", lease_id=424242))
    assert await status_of(no_lease) == grpc.StatusCode.NOT_FOUND
    assert await stream_status(kv.Watch(metadata_pb2.WatchKeysRequest(prefix="", start_revision=-3))) == INVALID
    assert (await kv.Range(metadata_pb2.RangeRequest())).kvs == []  # nothing was written
    assert (await kv.Put(metadata_pb2.PutKeyRequest(key="k", value=b"v"))).revision > 0


async def test_keyvalue_watch_from_a_compacted_revision_is_out_of_range(mem: MetadataClient) -> None:
    first = (await mem.kv.Put(metadata_pb2.PutKeyRequest(key="a", value=b"0"))).revision
    for i in range(80):  # retain=64: the first revisions are dropped from the log
        await mem.kv.Put(metadata_pb2.PutKeyRequest(key="a", value=str(i).encode()))
    status = await stream_status(mem.kv.Watch(metadata_pb2.WatchKeysRequest(prefix="a", start_revision=first)))
    assert status == grpc.StatusCode.OUT_OF_RANGE
    # Membership answers the same situation with a SNAPSHOT instead.
    reader = StreamReader[metadata_pb2.MembershipEvent](
        mem.membership.Watch(metadata_pb2.WatchRequest(start_revision=first)))
    try:
        assert (await reader.next()).type == metadata_pb2.SNAPSHOT
    finally:
        await reader.close()
