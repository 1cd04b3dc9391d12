"""What the operator produces actually runs: a pool's objects as local pods (tests/deploy/local_kube.py).

For a managed pool the operator's etcd StatefulSet is stood in for by a real etcd; for a
bring-your-own Redis pool, a real Redis with a password, so the password Secret → $(VAR) →
backend URI path is exercised end to end. The cache nodes must register under their pod
names with their headless-Service addresses and round-trip values.

The managed pool runs secure by default: its Certificates are issued from a local CA in
cert-manager's place (kvmesh.tools.certs, as for the demo overlay), the pods mount their Secrets
and the pool's policy ConfigMap, become ready through their `kvmesh health` exec probes, and the
cache nodes' registrations pass the policy; a client the spec grants a namespace uses it, one it
does not is refused, a plaintext client gets nowhere. The Redis pool opts out (`tls.enabled:
false`) and runs in plaintext with `grpc:` probes, as before.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvmesh.security.tls import ClientTLS
from kvmesh.services.operator.resources import desired_objects
from kvmesh.services.operator.spec import parse_spec
from kvmesh.tools.testing.servers import ServerHandle, etcd_server, start_redis
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc
from tests.deploy.local_kube import LocalKube
from tests.deploy.mesh_checks import channel, expect_members, expect_plaintext_refused, expect_round_trip
from tests.operator.test_reconcile import make_pool

PASSWORD = "s3cret-pw"
CLIENT_GRANTS = {"engine-x": {"namespaces": {"read": ["kv"], "write": ["kv"]}}}


def put_get(address: str, tls: ClientTLS) -> bytes:
    with channel(address, tls) as ch:
        cache = cachenode_pb2_grpc.KVCacheStub(ch)
        cache.Put(cachenode_pb2.PutRequest(namespace="kv", key=b"k" * 16, value=b"v" * 4096), timeout=10)
        return bytes(cache.Get(cachenode_pb2.GetRequest(namespace="kv", key=b"k" * 16), timeout=10).value)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, ServerHandle]]:
    if request.param == "etcd":
        with etcd_server() as handle:
            yield "etcd", handle
        return
    with tempfile.TemporaryDirectory(prefix="kvmesh-op-redis-") as tmp:
        handle = start_redis(Path(tmp), extra_args=["--requirepass", PASSWORD])
        try:
            yield "redis", handle
        finally:
            handle.stop()


@pytest.mark.integration
@pytest.mark.timeout(180)
@pytest.mark.parametrize("backend", ["etcd", "redis"], indirect=True)
def test_pool_objects_form_a_mesh(backend: tuple[str, ServerHandle], tmp_path: Path) -> None:
    kind, server = backend
    spec: dict[str, Any] = {
        "replicas": 2,
        "cache": {"engine": "memory://?capacity=64MiB,disk:///data?capacity=256MiB"},
    }
    infra: dict[tuple[str, int], str] = {}
    secrets: dict[tuple[str, str], str] = {}
    if kind == "etcd":
        spec["metadata"] = {"managed": {}, "replicas": 2}
        spec["policy"] = {"principals": CLIENT_GRANTS}
        infra[("pool-a-etcd", 2379)] = server.address
    else:
        spec["metadata"] = {"redis": {"address": f"redis.infra.svc:{server.port}", "db": 3,
                                      "passwordSecretRef": {"name": "redis-auth", "key": "password"}},
                            "replicas": 2}
        infra[("redis.infra.svc", server.port)] = server.address
        secrets[("redis-auth", "password")] = PASSWORD
        spec["tls"] = {"enabled": False}
    pool = make_pool(spec)
    kube = LocalKube(desired_objects(pool, parse_spec(spec)), tmp_path, infra, secrets)
    metadata, cachenodes = kube.of("metadata"), kube.of("cachenode")
    assert len(metadata) == 2 and [p.name for p in cachenodes] == ["pool-a-cache-0", "pool-a-cache-1"]
    secure = kind == "etcd"
    assert all(("KVMESH_SECURITY_POLICY" in p.env) == secure for p in kube.pods)
    if kind == "redis":
        assert metadata[0].env["KVMESH_BACKEND"] == f"redis://:{PASSWORD}@redis.infra.svc:{server.port}/3"
    admin = kube.client_tls("kvmesh-admin") if secure else None
    try:
        kube.start_ready(metadata)
        kube.start_ready(cachenodes)
        expected = {p.name: kube.local(p) for p in cachenodes}
        for pod in metadata:
            expect_members(kube.local(pod), expected, {}, tls=admin)
        for name, address in expected.items():
            expect_round_trip(address, name, min_tiers=2, tls=admin)
        if secure:
            address = expected["pool-a-cache-0"]
            assert put_get(address, kube.client_tls("engine-x")) == b"v" * 4096
            with pytest.raises(grpc.RpcError) as refused:
                put_get(address, kube.client_tls("stranger"))
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED, refused.value
            for pod in kube.pods:
                expect_plaintext_refused(kube.local(pod))
    finally:
        leaked = kube.stop()
    assert not leaked, f"still running after SIGTERM: {leaked}"
