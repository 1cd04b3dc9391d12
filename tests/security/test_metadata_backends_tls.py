"""The metadata backends over TLS with authentication, against real servers configured that way:
Redis with a TLS-only port, client certificates and an ACL user; etcd with https, client-certificate
auth and `auth enable` (user and password). Each also refuses what it should."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kvmesh.runtime.errors import Unavailable
from kvmesh.services.metadata.stores.base import Store
from kvmesh.services.metadata.stores.registry import open_store
from tests.security.conftest import Pki
from tests.security.tls_servers import start_etcd_tls, start_redis_tls

pytestmark = pytest.mark.integration


async def _exercise(store: Store) -> None:
    """A lease, a key bound to it, a watch that sees the write, and the lease's end."""
    lease, _ = await store.grant(30)
    start = await store.revision()
    watch = store.watch("members/", start)
    first = asyncio.ensure_future(watch.__anext__())
    await asyncio.sleep(0.2)
    await store.put("members/a", b"hello", lease)
    change = await asyncio.wait_for(first, 10)
    assert (change.kind, change.key, change.value) == ("put", "members/a", b"hello")
    await watch.aclose()
    entry = await store.get("members/a")
    assert entry is not None and entry.value == b"hello" and entry.lease_id == lease
    await store.revoke(lease)
    assert await store.get("members/a") is None


async def _refused(uri: str) -> None:
    with pytest.raises(Unavailable):
        store = await open_store(uri)
        try:
            await store.ping()
        finally:
            await store.close()


async def test_redis_with_tls_and_an_acl_user(pki: Pki, tmp_path: Path) -> None:
    server = start_redis_tls(tmp_path, pki.ca, pki.issue("redis"), "kvmesh", "s3cret-pw")
    client = pki.issue("metadata")
    (tmp_path / "pw").write_text("s3cret-pw\n")
    tls = f"ca={pki.ca.cert_path}&cert={client.cert}&key={client.key}&timeout=2&sweep_ms=50"
    try:
        store = await open_store(f"rediss://kvmesh@{server.address}/0?password_file={tmp_path / 'pw'}&{tls}")
        try:
            await _exercise(store)
        finally:
            await store.close()
        await _refused(f"rediss://kvmesh:wrong@{server.address}/0?{tls}")           # bad password
        await _refused(f"rediss://{server.address}/0?{tls}")                        # default user is off
        await _refused(f"rediss://kvmesh:s3cret-pw@{server.address}/0?ca={pki.ca.cert_path}&timeout=2")  # no cert
        await _refused(f"redis://kvmesh:s3cret-pw@{server.address}/0?timeout=2")    # plaintext
    finally:
        server.stop()


async def test_etcd_with_tls_client_certificates_and_auth(pki: Pki, tmp_path: Path) -> None:
    client = pki.issue("metadata-etcd", common_name=False)  # etcd's gateway refuses CNs with auth on
    server = start_etcd_tls(tmp_path, pki.ca, pki.issue("etcd"), client, {"kvmesh": ("etcd-pw", "/kvmesh/")})
    (tmp_path / "pw").write_text("etcd-pw")
    tls = f"ca={pki.ca.cert_path}&cert={client.cert}&key={client.key}&timeout=3"
    try:
        store = await open_store(f"etcds://{server.address}?user=kvmesh&password_file={tmp_path / 'pw'}&{tls}")
        try:
            await _exercise(store)
        finally:
            await store.close()
        await _refused(f"etcds://kvmesh:wrong@{server.address}?{tls}")             # bad password
        await _refused(f"etcds://{server.address}?{tls}")                          # no user: auth is on
        await _refused(f"etcds://kvmesh:etcd-pw@{server.address}?ca={pki.ca.cert_path}&timeout=3")  # no cert
        await _refused(f"etcd://kvmesh:etcd-pw@{server.address}?timeout=3")        # plaintext
        # Outside its role's prefix the user is refused too.
        other = await open_store(f"etcds://kvmesh:etcd-pw@{server.address}?prefix=/other&{tls}")
        try:
            with pytest.raises(Unavailable):
                await other.put("k", b"v")
        finally:
            await other.close()
    finally:
        server.stop()
