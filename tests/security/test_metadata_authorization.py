"""The metadata service's authorization on real processes with a policy and a CA made here.

Each attack of issue 12 that concerns metadata is tried and must be refused, changing nothing:
take-over of a live member id, fake capacity, another role or id, KeepAlive/Deregister of another
principal's lease (a SIGKILLed node still expires on its TTL), lease probing with
`Put(lease_id=X)`, and metadata reads and writes outside the granted prefixes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.security.identity import token_digest
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.services.metadata.stores.base import MAX_LEASE_ID
from kvmesh.services.metadata.stores.registry import open_store
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc
from tests.metadata.conftest import backend_uri
from tests.security.conftest import Pki

pytestmark = pytest.mark.integration

TENANT_TOKEN = "tenant-a-0b7e51c2f4"
ADMIN_TOKEN = "ops-8d21c94aa3"
CAPACITY_BOUND = 1024**3


def _policy(path: Path) -> Path:
    path.write_text(json.dumps({"principals": {
        "cachenode-*": {"register": {"roles": ["cachenode"], "members": ["self"],
                                     "max_capacity_bytes": CAPACITY_BOUND},
                        "metadata": {"read": ["self"], "write": ["self"]}},
        # May register any cache node or engine id, but owns only what it registered.
        "operator": {"register": {"roles": ["cachenode", "engine"], "members": ["*"]}},
        "tenant-a": {"tokens_sha256": [token_digest(TENANT_TOKEN)],
                     "metadata": {"read": ["config/"], "write": ["config/tenant-a/"]}},
        "ops": {"tokens_sha256": [token_digest(ADMIN_TOKEN)], "admin": True},
    }}))
    return path


def _token(pki: Pki, token: str | None) -> ClientTLS:
    return ClientTLS(TLSFiles(tls_ca=pki.ca.cert_path), (lambda: token) if token else None)


def _node(node_id: str, port: int, capacity: int = 1024**2, role: int = common_pb2.ROLE_CACHENODE
          ) -> common_pb2.Member:
    return common_pb2.Member(id=node_id, role=role, address=f"127.0.0.1:{port}",  # type: ignore[arg-type]
                             capacity_bytes=capacity)


class Caller:
    """One principal's stubs on its own channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.membership = metadata_pb2_grpc.MembershipStub(channel)
        self.kv = metadata_pb2_grpc.MetadataStub(channel)

    async def register(self, member: common_pb2.Member, ttl: int = 30) -> int:
        reply = await self.membership.Register(metadata_pb2.RegisterRequest(member=member, ttl_seconds=ttl), timeout=5)
        return int(reply.lease_id)

    async def keepalive(self, lease_id: int) -> None:
        call = self.membership.KeepAlive(iter([metadata_pb2.KeepAliveRequest(lease_id=lease_id)]), timeout=5)
        async for _ in call:
            break
        call.cancel()

    async def members(self) -> dict[str, common_pb2.Member]:
        reply = await self.membership.List(metadata_pb2.ListRequest(), timeout=5)
        return {m.id: m for m in reply.members}


@contextlib.asynccontextmanager
async def _callers(address: str, **tls: ClientTLS) -> AsyncIterator[dict[str, Caller]]:
    async with contextlib.AsyncExitStack() as stack:
        yield {name: Caller(await stack.enter_async_context(open_channel(address, tls=t))) for name, t in tls.items()}


async def _refusal(call: Any) -> tuple[grpc.StatusCode, str]:
    """The status and message a call ends with (OK, "" when it succeeds)."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _unknown_lease() -> int:
    return secrets.randbelow(MAX_LEASE_ID) + 1


async def _looks_unknown(call: Any, lease_id: int, unknown_call: Any, unknown_id: int) -> None:
    """`call` on lease `lease_id` answers exactly like `unknown_call` on a lease nobody holds."""
    code, message = await _refusal(call)
    unknown_code, unknown_message = await _refusal(unknown_call)
    assert unknown_code == grpc.StatusCode.NOT_FOUND, unknown_message
    assert code == unknown_code and message.replace(str(lease_id), "X") == unknown_message.replace(
        str(unknown_id), "X"), (code, message, unknown_message)


@pytest.mark.parametrize("backend_name", ["memory", "etcd", "redis"])
async def test_membership_attacks_are_refused(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path,
                                              backend_name: str) -> None:
    settings = pki.server_flags(pki.issue("metadata"), security_policy=_policy(tmp_path / "policy.json"))
    backend = backend_uri(request, backend_name)
    async with process_mesh(metadata=1, metadata_backend=backend, metadata_settings=settings,
                            wait_registered=False) as mesh, \
            _callers(mesh.metadata_address, victim=pki.client(pki.issue("cachenode-0")),
                     attacker=pki.client(pki.issue("cachenode-9")), operator=pki.client(pki.issue("operator")),
                     admin=pki.client(pki.issue("ops"))) as c:
        victim, attacker, operator, admin = c["victim"], c["attacker"], c["operator"], c["admin"]
        denied = grpc.StatusCode.PERMISSION_DENIED
        lease = await victim.register(_node("cachenode-0", 7000))
        before = await admin.members()
        assert before["cachenode-0"].address == "127.0.0.1:7000"
        revision = (await admin.kv.Range(metadata_pb2.RangeRequest(prefix=""), timeout=5)).revision

        # Take-over of a live member id: by another cache node (the policy: only itself), and by a
        # principal the policy lets register that id (ownership: not while someone else's is live).
        assert (await _refusal(attacker.register(_node("cachenode-0", 6666))))[0] == denied
        code, message = await _refusal(operator.register(_node("cachenode-0", 6666)))
        assert code == denied and "registered by another principal" in message
        # Fake capacity, another role, another id.
        code, message = await _refusal(attacker.register(_node("cachenode-9", 6666, capacity=2**64 - 1)))
        assert code == denied and f"at most {CAPACITY_BOUND}" in message
        assert (await _refusal(attacker.register(_node("cachenode-9", 6666, role=common_pb2.ROLE_ROUTER))))[0] == denied
        assert (await _refusal(attacker.register(_node("engine-0", 6666, role=common_pb2.ROLE_ENGINE))))[0] == denied

        # Somebody else's lease, even known, looks like an unknown one: KeepAlive, Deregister and
        # binding a key to it (the probe that told a live lease from a dead one).
        unknown = _unknown_lease()
        await _looks_unknown(attacker.keepalive(lease), lease, attacker.keepalive(unknown), unknown)
        await _looks_unknown(operator.keepalive(lease), lease, operator.keepalive(unknown), unknown)
        await _looks_unknown(attacker.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=lease), timeout=5),
                             lease, attacker.membership.Deregister(
                                 metadata_pb2.DeregisterRequest(lease_id=unknown), timeout=5), unknown)

        def probe(lease_id: int) -> Any:
            return attacker.kv.Put(metadata_pb2.PutKeyRequest(key="cachenode-9/probe", value=b"x", lease_id=lease_id),
                                   timeout=5)

        await _looks_unknown(probe(lease), lease, probe(unknown), unknown)
        assert await admin.members() == before  # nothing changed, not even the store's revision
        assert (await admin.kv.Range(metadata_pb2.RangeRequest(prefix=""), timeout=5)).revision == revision
        reply = await admin.kv.Get(metadata_pb2.GetKeyRequest(key="cachenode-9/probe"), timeout=5)
        assert not reply.found

        # Its own lease the attacker may use; the victim keeps using its own.
        own = await attacker.register(_node("cachenode-9", 6666))
        await probe(own)
        await victim.keepalive(lease)
        assert await victim.register(_node("cachenode-0", 7001)) != lease  # re-register: same principal
        assert (await admin.members())["cachenode-0"].address == "127.0.0.1:7001"

        # Admins may act on any member; an ended member's id is free to whoever may register it.
        await admin.keepalive(own)
        await admin.membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=own), timeout=5)
        assert "cachenode-9" not in await admin.members()
        await operator.register(_node("cachenode-9", 6667))
        assert (await admin.members())["cachenode-9"].address == "127.0.0.1:6667"


@pytest.mark.parametrize("backend_name", ["redis", "etcd"])
async def test_a_killed_member_expires_despite_foreign_keepalives(request: pytest.FixtureRequest, pki: Pki,
                                                                  tmp_path: Path, backend_name: str) -> None:
    """A cache node is SIGKILLed; an attacker who learned its lease id (here: read from the backend,
    as a guesser would find it) keeps sending KeepAlive for it. Every one is refused, and the node
    leaves on its 2 s TTL (it stayed a zombie 12 s past its TTL before)."""
    settings = pki.server_flags(pki.issue("metadata"), security_policy=_policy(tmp_path / "policy.json"))
    backend = backend_uri(request, backend_name)
    store = await open_store(backend)
    try:
        async with process_mesh(metadata=1, metadata_backend=backend, metadata_settings=settings,
                                wait_registered=False) as mesh, \
                _callers(mesh.metadata_address, attacker=pki.client(pki.issue("cachenode-9")),
                         admin=pki.client(pki.issue("ops"))) as c:
            attacker, admin = c["attacker"], c["admin"]
            await mesh.add("cachenode", ttl_seconds=2, **pki.server_flags(pki.issue("cachenode-0")))

            async def victim_lease() -> int:
                entries, _ = await store.range("leases/")
                found = [int(e.key.rsplit("/", 1)[1]) for e in entries
                         if e.value.split(b"\n")[0] == b"members/cachenode/cachenode-0"]
                assert found, entries
                return found[0]

            lease = await eventually(victim_lease, timeout=20, what="the cache node's lease",
                                     retry_on=(AssertionError,))
            await mesh.kill("cachenode-0")
            killed = time.monotonic()
            refusals: list[grpc.StatusCode] = []

            async def gone() -> bool:
                refusals.append((await _refusal(attacker.keepalive(lease)))[0])
                assert "cachenode-0" not in await admin.members()
                return True

            await eventually(gone, timeout=10, interval=0.3, what="the killed node to leave",
                             retry_on=(AssertionError,))
            assert time.monotonic() - killed < 2 + 1.5
            assert refusals and set(refusals) == {grpc.StatusCode.NOT_FOUND}
            await asyncio.sleep(1)
            assert "cachenode-0" not in await admin.members()
    finally:
        await store.close()


async def test_metadata_keys_only_under_granted_prefixes(pki: Pki, tmp_path: Path) -> None:
    settings = pki.server_flags(pki.issue("metadata"), require_client_cert=False,
                                security_policy=_policy(tmp_path / "policy.json"))
    async with process_mesh(metadata=1, metadata_settings=settings, wait_registered=False) as mesh, \
            _callers(mesh.metadata_address, tenant=_token(pki, TENANT_TOKEN), admin=_token(pki, ADMIN_TOKEN),
                     anonymous=_token(pki, None)) as c:
        tenant, admin, anonymous = c["tenant"].kv, c["admin"].kv, c["anonymous"].kv
        denied = grpc.StatusCode.PERMISSION_DENIED
        seeded = {"config/models": b"m1", "config/tenant-b/x": b"b", "secret/root": b"s"}
        for key, value in seeded.items():
            await admin.Put(metadata_pb2.PutKeyRequest(key=key, value=value), timeout=5)

        # Missing credentials: UNAUTHENTICATED for reads and writes.
        for call in (anonymous.Get(metadata_pb2.GetKeyRequest(key="config/models"), timeout=5),
                     anonymous.Put(metadata_pb2.PutKeyRequest(key="config/tenant-a/x", value=b"v"), timeout=5)):
            assert (await _refusal(call))[0] == grpc.StatusCode.UNAUTHENTICATED

        # Inside the grants: read config/, write config/tenant-a/.
        await tenant.Put(metadata_pb2.PutKeyRequest(key="config/tenant-a/x", value=b"mine"), timeout=5)
        assert (await tenant.Get(metadata_pb2.GetKeyRequest(key="config/models"), timeout=5)).value == b"m1"
        swapped = await tenant.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(
            key="config/tenant-a/y", expected_mod_revision=0, value=b"new"), timeout=5)
        assert swapped.succeeded

        # Outside them: refused, with the policy's reason.
        code, message = await _refusal(tenant.Put(metadata_pb2.PutKeyRequest(key="config/tenant-b/x", value=b"evil"),
                                                  timeout=5))
        assert code == denied and "may not write metadata key 'config/tenant-b/x'" in message
        for call in (tenant.Put(metadata_pb2.PutKeyRequest(key="config/models", value=b"evil"), timeout=5),
                     tenant.Delete(metadata_pb2.DeleteKeyRequest(key="config/tenant-b/x"), timeout=5),
                     tenant.Delete(metadata_pb2.DeleteKeyRequest(key="secret/root"), timeout=5),
                     tenant.Get(metadata_pb2.GetKeyRequest(key="secret/root"), timeout=5),
                     tenant.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(
                         key="config/tenant-b/x", expected_mod_revision=0, value=b"evil"), timeout=5),
                     tenant.CompareAndSwap(metadata_pb2.CompareAndSwapRequest(
                         key="secret/root", expected_mod_revision=0, value=b"evil"), timeout=5)):
            assert (await _refusal(call))[0] == denied

        # Range leaves out what the tenant may not read (the limit counts what it returns).
        listed = await tenant.Range(metadata_pb2.RangeRequest(prefix=""), timeout=5)
        assert [kv.key for kv in listed.kvs] == ["config/models", "config/tenant-a/x", "config/tenant-a/y",
                                                 "config/tenant-b/x"]
        assert not (await tenant.Range(metadata_pb2.RangeRequest(prefix="secret/"), timeout=5)).kvs
        limited = await tenant.Range(metadata_pb2.RangeRequest(prefix="", limit=1), timeout=5)
        assert [kv.key for kv in limited.kvs] == ["config/models"]

        # Nothing outside the grants changed.
        everything = await admin.Range(metadata_pb2.RangeRequest(prefix=""), timeout=5)
        assert {kv.key: kv.value for kv in everything.kvs} == {
            **seeded, "config/tenant-a/x": b"mine", "config/tenant-a/y": b"new"}


async def test_key_watch_shows_only_readable_keys(pki: Pki, tmp_path: Path) -> None:
    settings = pki.server_flags(pki.issue("metadata"), require_client_cert=False,
                                security_policy=_policy(tmp_path / "policy.json"))
    async with process_mesh(metadata=1, metadata_settings=settings, wait_registered=False) as mesh, \
            _callers(mesh.metadata_address, tenant=_token(pki, TENANT_TOKEN), admin=_token(pki, ADMIN_TOKEN)) as c:
        tenant, admin = c["tenant"].kv, c["admin"].kv
        start = (await admin.Range(metadata_pb2.RangeRequest(prefix=""), timeout=5)).revision
        for key in ("secret/a", "config/b", "secret/c", "config/d"):
            await admin.Put(metadata_pb2.PutKeyRequest(key=key, value=b"v"), timeout=5)
        seen: list[str] = []
        call = tenant.Watch(metadata_pb2.WatchKeysRequest(prefix="", start_revision=start), timeout=10)
        async for event in call:
            seen.append(event.kv.key)
            if event.kv.key == "config/d":
                break
        call.cancel()
        assert seen == ["config/b", "config/d"]


async def test_ownership_holds_across_replicas(request: pytest.FixtureRequest, pki: Pki, tmp_path: Path) -> None:
    """Two metadata replicas over one Redis: a lease registered through one is its owner's on the
    other too (the owner is stored in the backend, not in a replica's memory)."""
    settings = pki.server_flags(pki.issue("metadata"), security_policy=_policy(tmp_path / "policy.json"))
    async with process_mesh(metadata=2, metadata_backend=backend_uri(request, "redis"), metadata_settings=settings,
                            wait_registered=False) as mesh:
        first, second = mesh.metadata_addresses
        async with _callers(first, victim=pki.client(pki.issue("cachenode-0"))) as a, \
                _callers(second, victim=pki.client(pki.issue("cachenode-0")),
                         operator=pki.client(pki.issue("operator"))) as b:
            lease = await a["victim"].register(_node("cachenode-0", 7000))
            unknown = _unknown_lease()
            await _looks_unknown(b["operator"].keepalive(lease), lease, b["operator"].keepalive(unknown), unknown)
            code, _ = await _refusal(b["operator"].register(_node("cachenode-0", 6666)))
            assert code == grpc.StatusCode.PERMISSION_DENIED
            await b["victim"].keepalive(lease)  # the owner, on the other replica
            await b["victim"].membership.Deregister(metadata_pb2.DeregisterRequest(lease_id=lease), timeout=5)
            assert "cachenode-0" not in await a["victim"].members()
