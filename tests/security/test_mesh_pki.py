"""The policy `kvmesh up` writes grants each member exactly what its role needs (decided by the
policy's own functions on the file it writes), and its certificates name the members."""

from __future__ import annotations

from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from kvmesh.security.identity import Principal
from kvmesh.security.policy import (
    PolicyFile,
    allows_events,
    allows_metadata,
    allows_namespace,
    allows_register,
    allows_route,
    is_admin,
)
from kvmesh.tools.mesh_pki import MeshCredentials, prepare_mesh_credentials

CAPACITY = 4 << 20


def _prepare(directory: Path) -> MeshCredentials:
    return prepare_mesh_credentials(directory, host="127.0.0.1", cachenodes=["cachenode-0", "cachenode-1"],
                                    node_capacity_bytes=CAPACITY, router="router", engines=["engine-0", "engine-1"],
                                    engine_namespace="kvmesh")


def _who(name: str) -> Principal:
    return Principal(name, "certificate")


def test_each_member_gets_what_its_role_needs_and_nothing_else(tmp_path: Path) -> None:
    creds = _prepare(tmp_path)
    policy = PolicyFile(creds.policy).current()
    node, router, engine, up, cli, md = (_who(n) for n in (
        "cachenode-0", "router", "engine-0", "kvmesh-up", "kvmesh-cli", "metadata"))
    # A cache node: only itself, only as a cache node, only within its capacity.
    assert allows_register(policy, node, "cachenode-0", "cachenode", CAPACITY)
    assert not allows_register(policy, node, "cachenode-0", "cachenode", CAPACITY + 1)
    assert not allows_register(policy, node, "cachenode-1", "cachenode", 1)
    assert not allows_register(policy, node, "cachenode-0", "engine")
    assert not allows_namespace(policy, node, "kvmesh", write=True)
    # The router: itself as the router; no events, no namespaces.
    assert allows_register(policy, router, "router", "router")
    assert not allows_register(policy, router, "engine-0", "engine")
    assert not allows_events(policy, router, "engine-0")
    # An engine: itself as an engine, its own events, its pool namespace; never another's.
    assert allows_register(policy, engine, "engine-0", "engine")
    assert not allows_register(policy, engine, "engine-1", "engine")
    assert not allows_register(policy, engine, "engine-0", "cachenode")
    assert allows_events(policy, engine, "engine-0") and not allows_events(policy, engine, "engine-1")
    assert allows_namespace(policy, engine, "kvmesh", write=True)
    assert allows_namespace(policy, engine, "kvmesh", write=False)
    assert not allows_namespace(policy, engine, "tenant-a", write=False)
    assert not allows_route(policy, engine) and not is_admin(policy, engine)
    # The supervisor is admin; a person's tools may route, nothing more; metadata gets nothing.
    assert is_admin(policy, up) and allows_route(policy, up)
    assert allows_route(policy, cli) and not is_admin(policy, cli)
    assert not allows_register(policy, cli, "kvmesh-cli", "engine")
    assert not allows_metadata(policy, cli, "config/x", write=False)
    assert not allows_register(policy, md, "metadata", "router") and not allows_route(policy, md)
    # An unknown name from the same CA is authenticated but granted nothing.
    assert not allows_route(policy, _who("engine-9")) and not allows_events(policy, _who("engine-9"), "engine-9")


def test_certificates_name_the_members_and_the_ca_is_reused(tmp_path: Path) -> None:
    first = _prepare(tmp_path)
    second = _prepare(tmp_path)
    assert second.ca.cert.serial_number == first.ca.cert.serial_number
    for name, issued in second.issued.items():
        cert = x509.load_pem_x509_certificate(issued.cert.read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == name
        assert issued.key.stat().st_mode & 0o077 == 0
    flags = second.flags("router")
    assert flags[flags.index("--security-policy") + 1] == str(tmp_path / "policy.yaml")
    assert "--tls-require-client-cert" in flags
    assert (tmp_path / "client.env").read_text().count("export KVMESH_TLS_") == 3
