"""Pools are secure by default: every kvmesh pod of a pool runs mutual TLS from a cert-manager
Certificate, enforces the pool's least-privilege policy and is probed over mutual TLS; `tls.enabled:
false` renders the plaintext pool of before. The policy is checked with the services' own decision
functions (kvmesh/security/policy.py), not by reading its text."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmesh.security.identity import Principal
from kvmesh.security.policy import (
    allows_events,
    allows_namespace,
    allows_register,
    allows_route,
    is_admin,
    parse_policy,
)
from kvmesh.services.operator.reconcile import key, plan
from kvmesh.services.operator.resources import MESH_NAME, POLICY_DIR, TLS_DIR, desired_objects, names
from kvmesh.services.operator.spec import DEFAULT_ISSUER, DEFAULT_ISSUER_KIND, SpecError, parse_spec
from kvmesh.units import parse_size
from tests.deploy import cert_manager
from tests.deploy.cli_envs import setting_envs
from tests.operator.test_reconcile import as_server_returns, example, find, make_pool, validate_pool_objects

OPERATOR = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "operator"


def kvmesh_workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")
            and o["spec"]["template"]["spec"]["containers"][0]["image"].startswith("kvmesh/")]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def pool_policy(objs: list[dict[str, Any]], pool_name: str = "pool-a") -> Any:
    configmap = find(objs, "ConfigMap", names(pool_name)["policy"])
    return parse_policy(configmap["data"]["policy.yaml"], "pool policy")


def who(name: str) -> Principal:
    return Principal(name, "certificate")


@pytest.mark.parametrize("stem", ["managed", "byo-etcd", "byo-redis"])
def test_every_kvmesh_pod_mounts_its_certificate_and_the_policy(stem: str) -> None:
    pool = example(stem)
    spec = parse_spec(pool["spec"])
    objs = desired_objects(pool, spec)
    pool_name, ns = pool["metadata"]["name"], pool["metadata"]["namespace"]
    certificates = {c["spec"]["secretName"]: c for c in objs if c["kind"] == "Certificate"}
    assert len(certificates) == 2
    issuer = spec.tls.issuer_ref
    for cert in certificates.values():
        cert_manager.validate(cert)
        s = cert["spec"]
        assert s["issuerRef"] == {"group": issuer.group, "kind": issuer.kind, "name": issuer.name}
        assert MESH_NAME in s["dnsNames"] and "127.0.0.1" in s["ipAddresses"]  # clients expect it; probes dial loopback
        assert {"server auth", "client auth"} <= set(s["usages"]) and not s.get("isCA")
        assert s["privateKey"]["rotationPolicy"] == "Always" and s["renewBefore"]
    configmap = find(objs, "ConfigMap", names(pool_name)["policy"])
    used = set()
    for workload in kvmesh_workloads(objs):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        secret = volumes[mounts[TLS_DIR]["name"]]["secret"]["secretName"]
        assert mounts[TLS_DIR]["readOnly"] and mounts[POLICY_DIR]["readOnly"]
        assert volumes[mounts[POLICY_DIR]["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
        used.add(secret)
        cert = certificates[secret]["spec"]
        # The identity is the workload's name; the certificate names where clients reach it.
        assert cert["commonName"] == workload["metadata"]["name"]
        if workload["kind"] == "StatefulSet":
            headless = workload["spec"]["serviceName"]
            pod_dns = f"{workload['metadata']['name']}-0.{headless}.{ns}.svc"
            assert any(fnmatch.fnmatchcase(pod_dns, d) for d in cert["dnsNames"]), cert["dnsNames"]
        assert f"{names(pool_name)['metadata']}.{ns}.svc" in certificates[names(pool_name)["metadata_tls"]][
            "spec"]["dnsNames"]
        env = env_of(container)
        assert env["KVMESH_TLS_CERT"] == f"{TLS_DIR}/tls.crt" and env["KVMESH_TLS_KEY"] == f"{TLS_DIR}/tls.key"
        assert env["KVMESH_TLS_CA"] == f"{TLS_DIR}/ca.crt" and env["KVMESH_TLS_SERVER_NAME"] == MESH_NAME
        assert env["KVMESH_TLS_REQUIRE_CLIENT_CERT"] == "true"
        directory, _, file = env["KVMESH_SECURITY_POLICY"].rpartition("/")
        assert directory == POLICY_DIR and file in configmap["data"]
        # Each variable is one the service really reads (a misspelt one would be silently ignored).
        role = container["args"][0]
        unknown = {n for n in env if n.startswith("KVMESH_")} - setting_envs(role) - {"KVMESH_REDIS_PASSWORD"}
        assert not unknown, (role, unknown)
        # Probes: `kvmesh health` over mutual TLS in the container (a grpc: probe has no client certificate).
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == ["kvmesh", "health", "--quiet"], probe
            assert "grpc" not in container[probe]
    assert used == set(certificates), "a Certificate no pod uses"


def test_the_policy_grants_each_workload_exactly_what_it_needs() -> None:
    pool = example("managed")  # memory 8 GiB over disk 100 GiB
    objs = desired_objects(pool, parse_spec(pool["spec"]))
    policy = pool_policy(objs)
    cache, metadata = who("pool-a-cache"), who("pool-a-metadata")
    largest = parse_size("100GiB")
    # The cache nodes register their own StatefulSet's pods, as cache nodes, up to the largest tier.
    for i in (0, 2, 17):
        assert allows_register(policy, cache, f"pool-a-cache-{i}", "cachenode", largest)
    assert not allows_register(policy, cache, "pool-a-cache-0", "cachenode", largest + 1)
    assert not allows_register(policy, cache, "pool-a-cache-0", "engine")
    assert not allows_register(policy, cache, "pool-a-cache-0", "router")
    for other in ("pool-a-metadata-0", "pool-b-cache-0", "pool-a-cache-headless", "pool-a-cache-x", "vllm-0"):
        assert not allows_register(policy, cache, other, "cachenode"), other
    assert not allows_events(policy, cache, "pool-a-cache-0")
    assert not allows_namespace(policy, cache, "kvmesh", write=False)
    assert not allows_route(policy, cache) and not is_admin(policy, cache)
    # The metadata service calls no one: nothing at all.
    assert policy.grants(metadata) == []
    # Another pool's cache nodes (same CA) and unknown names get nothing here.
    assert policy.grants(who("pool-b-cache")) == [] and policy.grants(who("stranger")) == []
    # A person's tools: admin, with a certificate issued on demand (the operator makes none).
    assert is_admin(policy, who("kvmesh-admin"))
    assert "kvmesh-admin" not in {c["spec"]["commonName"] for c in objs if c["kind"] == "Certificate"}


def test_capacity_bound_follows_the_tiers() -> None:
    bounded = desired_objects(make_pool(), parse_spec({"cache": {"engine": "memory://?capacity=3GiB"}}))
    policy = pool_policy(bounded)
    assert allows_register(policy, who("pool-a-cache"), "pool-a-cache-0", "cachenode", parse_size("3GiB"))
    assert not allows_register(policy, who("pool-a-cache"), "pool-a-cache-0", "cachenode", parse_size("3GiB") + 1)
    # A tier without a capacity (a Redis tier) leaves nothing to bound by.
    unbounded = desired_objects(make_pool(), parse_spec({"cache": {"engine": "memory://?capacity=1GiB,redis://r:6379"}}))
    assert allows_register(pool_policy(unbounded), who("pool-a-cache"), "pool-a-cache-0", "cachenode", 10**15)


def test_clients_get_the_grants_the_spec_gives_and_cannot_take_the_pools() -> None:
    spec = {"policy": {"principals": {
        "vllm": {"register": {"roles": ["engine"], "members": ["vllm-*"]}, "events": ["vllm-*"],
                 "namespaces": {"read": ["kvmesh"], "write": ["kvmesh"]}},
        "gateway": {"route": True},
        # Attempts to widen the pool's own identities are ignored: the operator's entries win.
        "pool-a-cache": {"admin": True},
        "pool-a-metadata": {"admin": True},
    }}}
    policy = pool_policy(desired_objects(make_pool(spec), parse_spec(spec)))
    vllm = who("vllm")
    assert allows_register(policy, vllm, "vllm-0", "engine") and allows_events(policy, vllm, "vllm-0")
    assert allows_namespace(policy, vllm, "kvmesh", write=True) and not allows_namespace(policy, vllm, "other", True)
    assert not allows_register(policy, vllm, "pool-a-cache-0", "cachenode")
    assert allows_route(policy, who("gateway")) and not allows_route(policy, vllm)
    assert not is_admin(policy, who("pool-a-cache")) and policy.grants(who("pool-a-metadata")) == []
    # A malformed grant is refused when the spec is parsed (status Failed, nothing changed).
    with pytest.raises(SpecError, match="regster"):
        parse_spec({"policy": {"principals": {"vllm": {"regster": {}}}}})
    with pytest.raises(SpecError, match=r"tls\.enabled"):
        parse_spec({"tls": {"enabled": False}, "policy": {"principals": {"vllm": {"route": True}}}})


def test_issuer_is_configurable() -> None:
    default = parse_spec({})
    assert (default.tls.issuer_ref.name, default.tls.issuer_ref.kind) == (DEFAULT_ISSUER, DEFAULT_ISSUER_KIND)
    spec = parse_spec({"tls": {"issuerRef": {"name": "team-ca", "kind": "Issuer"}}})
    objs = desired_objects(make_pool(), spec)
    refs = [c["spec"]["issuerRef"] for c in objs if c["kind"] == "Certificate"]
    assert refs == [{"group": "cert-manager.io", "kind": "Issuer", "name": "team-ca"}] * 2
    with pytest.raises(SpecError):
        parse_spec({"tls": {"issuerRef": {"kind": "Vault"}}})


def test_opting_out_renders_the_plaintext_pool() -> None:
    pool = example("plaintext")
    objs = desired_objects(pool, parse_spec(pool["spec"]))
    validate_pool_objects(objs)
    assert not [o for o in objs if o["kind"] in ("Certificate", "ConfigMap")]
    for workload in kvmesh_workloads(objs):
        pod = workload["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert not [k for k in env_of(container) if k.startswith(("KVMESH_TLS_", "KVMESH_SECURITY_"))]
        assert not [v for v in pod["volumes"] if "secret" in v or "configMap" in v]
        port = container["ports"][0]["containerPort"]
        assert container["readinessProbe"]["grpc"] == {"port": port} and "exec" not in container["readinessProbe"]


def test_turning_tls_off_and_on_moves_only_what_it_must() -> None:
    secure = make_pool()
    existing = as_server_returns(plan(secure, []).create)
    off = plan(make_pool({"tls": {"enabled": False}}, generation=2), existing)
    assert sorted(key(o)[1:] for o in off.delete) == [
        ("Certificate", "pool-a-cache"), ("Certificate", "pool-a-metadata"), ("ConfigMap", "pool-a-policy")]
    assert sorted(key(o)[2] for o in off.update) == ["pool-a-cache", "pool-a-metadata"] and not off.create
    # A new issuer re-issues the certificates and touches nothing else.
    moved = plan(make_pool({"tls": {"issuerRef": {"name": "other-ca"}}}, generation=3), existing)
    assert sorted(key(o)[1:] for o in moved.update) == [("Certificate", "pool-a-cache"),
                                                        ("Certificate", "pool-a-metadata")]
    # A client grant changes only the policy ConfigMap (running pods re-read it: no rollout).
    granted = plan(make_pool({"policy": {"principals": {"gw": {"route": True}}}}, generation=4), existing)
    assert [key(o)[1:] for o in granted.update] == [("ConfigMap", "pool-a-policy")]


def test_cluster_issuer_manifest_is_what_pools_default_to() -> None:
    """deploy/k8s/operator/cluster-issuer.yaml makes the ClusterIssuer the spec defaults to: a
    self-signed bootstrap signs the mesh CA, whose ClusterIssuer reads it from cert-manager's namespace."""
    objs = [d for d in yaml.safe_load_all((OPERATOR / "cluster-issuer.yaml").read_text()) if d]
    for obj in objs:
        cert_manager.validate(obj)
    issuers = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ClusterIssuer"}
    (ca,) = [o for o in objs if o["kind"] == "Certificate"]
    assert ca["spec"]["isCA"] and ca["metadata"]["namespace"] == "cert-manager"
    assert "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]["spec"]
    assert ca["spec"]["issuerRef"]["kind"] == "ClusterIssuer"
    assert DEFAULT_ISSUER_KIND == "ClusterIssuer"
    assert issuers[DEFAULT_ISSUER]["spec"]["ca"]["secretName"] == ca["spec"]["secretName"]
