"""Every kustomize overlay renders, passes `kubernetes-validate --strict` (cert-manager's resources:
their own schemas, tests/deploy/cert_manager.py), and keeps the promises of the design, mutual TLS
and the policy included."""

from __future__ import annotations

import copy
import fnmatch
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from kvmesh.security.identity import Principal
from kvmesh.security.policy import parse_policy
from kvmesh.security.settings import SecuritySettings
from kvmesh.tools.testing.envoy import K8S_PICKER_TLS
from tests.deploy import cert_manager
from tests.deploy.cli_envs import setting_envs
from tests.deploy.k8s import (
    K8S,
    KUBE_VERSIONS,
    by_kind,
    documents,
    pod_spec,
    render,
    selector_matches,
    validate_cli,
)

OVERLAYS = ("etcd", "byo-etcd", "byo-redis", "demo", "vllm")
KVMESH_PORTS = {"metadata": 7400, "cachenode": 7500, "router": 7600, "enginesim": 7700}
HEALTH = ["kvmesh", "health", "--quiet"]  # the exec probe: the kubelet's grpc probe cannot speak TLS
TLS_DIR = "/etc/kvmesh/tls"
MESH_NAME = "kvmesh-mesh"  # every certificate carries it; clients expect it (pods are dialled by IP)
# Tools (not services) read how to connect from these variables (kvmesh.security.client).
SECURITY_ENVS = frozenset(f"KVMESH_{name.upper()}" for name in SecuritySettings.model_fields)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[dict[str, Any]]]]:
    out = {}
    for overlay in OVERLAYS:
        text = render(K8S / "overlays" / overlay)
        path = tmp_path_factory.mktemp("k8s") / f"{overlay}.yaml"
        path.write_text(text)
        out[overlay] = (path, documents(text))
    return out


def _workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet", "Job")]


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in container.get("env", [])}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_overlay_validates_strictly(rendered, overlay: str, version: str) -> None:
    path, objs = rendered[overlay]
    done = validate_cli(path, version)
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(objs) >= 12
    # kubernetes-validate has no schema for cert-manager's kinds (and says so); they get their own.
    unchecked = {line.split(" kind ")[1].split(" with ")[0] for line in (done.stdout + done.stderr).splitlines()
                 if "Couldn't find schema" in line}
    assert unchecked <= set(cert_manager.KINDS), unchecked
    for obj in objs:
        if cert_manager.is_cert_manager(obj):
            cert_manager.validate(obj)


def test_cert_manager_validation_rejects_unknown_fields(rendered) -> None:
    """The cert-manager check has teeth too: a misspelt field or a bad enum fails."""
    _, objs = rendered["etcd"]
    cert = by_kind(objs, "Certificate")["kvmesh-router"]
    for bad in ({"dnsName": ["x"]}, {"usages": ["server-auth"]}, {"duration": "90 days"}):
        broken = copy.deepcopy(cert)
        broken["spec"].update(bad)
        with pytest.raises(jsonschema.ValidationError):
            cert_manager.validate(broken)
    issuer = copy.deepcopy(by_kind(objs, "Issuer")["kvmesh-ca"])
    issuer["spec"]["selfSigned"] = {}
    with pytest.raises(jsonschema.ValidationError):
        cert_manager.validate(issuer)


def test_strict_validation_rejects_unknown_fields(rendered) -> None:
    """The validator is not a rubber stamp: one unknown field in a rendered object fails."""
    _, objs = rendered["etcd"]
    bad = copy.deepcopy(by_kind(objs, "StatefulSet")["kvmesh-cachenode"])
    bad["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpcc"] = {"port": 7500}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_shape_of_the_mesh(rendered, overlay: str) -> None:
    _, objs = rendered[overlay]
    deployments, statefulsets = by_kind(objs, "Deployment"), by_kind(objs, "StatefulSet")
    services = by_kind(objs, "Service")
    assert deployments["kvmesh-metadata"]["spec"]["replicas"] == 2
    assert deployments["kvmesh-router"]["spec"]["replicas"] >= 1
    cache = statefulsets["kvmesh-cachenode"]
    assert cache["spec"]["replicas"] == 3
    headless = services[cache["spec"]["serviceName"]]
    assert headless["spec"]["clusterIP"] == "None"
    assert cache["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    assert {o["metadata"].get("namespace") for o in objs if o["kind"] != "Namespace"} == {"kvmesh"}
    # Every Service selects some pods of the render, on a port those pods expose.
    pods = [(o["spec"]["template"]["metadata"]["labels"], pod_spec(o)) for o in _workloads(objs)]
    for name, svc in services.items():
        targets = [spec for labels, spec in pods if selector_matches(svc["spec"]["selector"], labels)]
        assert targets, f"Service {name} selects nothing"
        exposed = {p.get("name") for spec in targets for c in spec["containers"] for p in c.get("ports", [])}
        exposed |= {p["containerPort"] for spec in targets for c in spec["containers"] for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in exposed, (name, port)
    if overlay in ("etcd", "demo", "vllm"):
        assert statefulsets["kvmesh-etcd"]["spec"]["replicas"] == 3
    else:
        assert "kvmesh-etcd" not in statefulsets
    if overlay == "demo":
        assert deployments["kvmesh-enginesim"]["spec"]["replicas"] == 2
        assert by_kind(objs, "Job")["kvmesh-bench"]["spec"]["template"]["spec"]["containers"][0]["args"][0] == "bench"
    if overlay == "vllm":  # every vLLM pod carries the agent sidecar, announcing its KV-event sockets
        spec = pod_spec(deployments["kvmesh-vllm"])
        agent = next(c for c in spec["containers"] if c["name"] == "agent")
        assert agent["args"] == ["agent"]
        env = _env(agent)
        assert env["KVMESH_ENGINE_URL"] == "http://127.0.0.1:8000"
        assert env["KVMESH_KV_EVENTS"].startswith("tcp://$(POD_IP):")
        assert by_kind(objs, "ConfigMap")[pod_spec(deployments["kvmesh-router"])["containers"][0]["envFrom"][-1]
                                          ["configMapRef"]["name"]]["data"]["KVMESH_BLOCK_SIZE"] == "16"


@pytest.mark.parametrize(
    ("overlay", "expected"),
    [
        ("etcd", "etcd://kvmesh-etcd:2379?prefix=/kvmesh"),
        ("demo", "etcd://kvmesh-etcd:2379?prefix=/kvmesh"),
        ("byo-etcd", "etcd://etcd.example.svc:2379?prefix=/kvmesh"),
        ("byo-redis", "redis://:$(KVMESH_REDIS_PASSWORD)@$(KVMESH_REDIS_ADDRESS)/$(KVMESH_REDIS_DB)"),
    ],
)
def test_metadata_backend_per_overlay(rendered, overlay: str, expected: str) -> None:
    """The backend URI the metadata pods get, after ConfigMap and $(VAR) wiring."""
    _, objs = rendered[overlay]
    configmaps = by_kind(objs, "ConfigMap")
    container = pod_spec(by_kind(objs, "Deployment")["kvmesh-metadata"])["containers"][0]
    env: dict[str, str] = {}
    for source in container["envFrom"]:
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    env.update(_env(container))
    assert env["KVMESH_BACKEND"] == expected
    if overlay == "byo-redis":
        names = [e["name"] for e in container["env"]]
        # $(VAR) expansion only sees variables defined earlier.
        assert names.index("KVMESH_REDIS_PASSWORD") < names.index("KVMESH_BACKEND")
        secret = next(e for e in container["env"] if e["name"] == "KVMESH_REDIS_PASSWORD")
        assert secret["valueFrom"]["secretKeyRef"] == {"name": "kvmesh-redis", "key": "password", "optional": True}
        assert env["KVMESH_REDIS_ADDRESS"] and env["KVMESH_REDIS_DB"] == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_are_hardened_probed_and_spread(rendered, overlay: str) -> None:
    _, objs = rendered[overlay]
    configmaps = by_kind(objs, "ConfigMap")
    pdbs = list(by_kind(objs, "PodDisruptionBudget").values())
    for obj in _workloads(objs):
        name, spec = obj["metadata"]["name"], pod_spec(obj)
        labels = obj["spec"]["template"]["metadata"]["labels"]
        sc = spec["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] != 0, name
        assert sc["seccompProfile"]["type"] == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        for c in spec["containers"]:
            csc = c["securityContext"]
            assert csc["allowPrivilegeEscalation"] is False and csc["capabilities"]["drop"] == ["ALL"], name
            assert csc["readOnlyRootFilesystem"] is True, name
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"], name
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in configmaps, (name, source)
            if c["image"].startswith("kvmesh/kvmesh"):
                assert c["image"] == "kvmesh/kvmesh:0.1.0"
                role = c["args"][0]
                if role in KVMESH_PORTS:
                    port = KVMESH_PORTS[role]
                    assert _env(c)["KVMESH_LISTEN"] == f"0.0.0.0:{port}", name  # the port the probe dials
                    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                        assert c[probe]["exec"]["command"] == HEALTH, (name, probe)
                        assert c[probe]["timeoutSeconds"] >= 5, (name, probe)  # a Python process starts
        if obj["kind"] == "Job":
            continue
        spread = spec["topologySpreadConstraints"]
        assert {t["topologyKey"] for t in spread} >= {"kubernetes.io/hostname"}, name
        assert all(selector_matches(t["labelSelector"], labels) for t in spread), name
        if obj["spec"]["replicas"] > 1 and labels["app.kubernetes.io/component"] != "enginesim":
            covering = [p for p in pdbs if selector_matches(p["spec"]["selector"], labels)]
            assert len(covering) == 1, f"{name} needs exactly one PodDisruptionBudget"


# Variables that only feed $(VAR) expansion of another variable (never read by kvmesh itself).
EXPANSION_HELPERS = {"KVMESH_REDIS_PASSWORD", "KVMESH_REDIS_ADDRESS", "KVMESH_REDIS_DB"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_kvmesh_variable_is_a_real_setting(rendered, overlay: str) -> None:
    """A misspelt KVMESH_* variable in a manifest would be silently ignored by the pod."""
    _, objs = rendered[overlay]
    configmaps = by_kind(objs, "ConfigMap")
    for obj in _workloads(objs):
        for c in pod_spec(obj)["containers"]:
            if not c["image"].startswith("kvmesh/kvmesh"):
                continue
            names = {e["name"] for e in c.get("env", [])}
            for source in c.get("envFrom", []):
                names |= set(configmaps[source["configMapRef"]["name"]]["data"])
            names = {n for n in names if n.startswith("KVMESH_")} - EXPANSION_HELPERS
            known = setting_envs(c["args"][0]) | (SECURITY_ENVS if c["args"][0] == "bench" else frozenset())
            unknown = names - known
            assert not unknown, f"{overlay}/{obj['metadata']['name']}: {sorted(unknown)} not read by {c['args'][0]}"


def _container_env(container: dict[str, Any], configmaps: dict[str, dict[str, Any]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(configmaps[source["configMapRef"]["name"]]["data"])
    env.update(_env(container))
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_kvmesh_pod_runs_mutual_tls_from_cert_manager_and_the_policy(rendered, overlay: str) -> None:
    """Secure by default: a self-signed bootstrap Issuer signs the mesh CA, whose Issuer signs one
    Certificate per workload; each kvmesh container mounts its Secret and points KVMESH_TLS_* at it,
    requires client certificates, and enforces the policy ConfigMap, which grants each identity
    something (the metadata service nothing)."""
    _, objs = rendered[overlay]
    configmaps, issuers, certs = by_kind(objs, "ConfigMap"), by_kind(objs, "Issuer"), by_kind(objs, "Certificate")
    ca_cert = next(c for c in certs.values() if c["spec"].get("isCA"))
    assert "selfSigned" in issuers[ca_cert["spec"]["issuerRef"]["name"]]["spec"]
    ca_secret = ca_cert["spec"]["secretName"]
    ca_issuers = {n for n, i in issuers.items() if i["spec"].get("ca", {}).get("secretName") == ca_secret}
    assert ca_issuers
    by_secret = {c["spec"]["secretName"]: c for c in certs.values() if not c["spec"].get("isCA")}
    for cert in by_secret.values():
        spec = cert["spec"]
        assert spec["issuerRef"]["name"] in ca_issuers and spec["issuerRef"]["kind"] == "Issuer", cert
        assert MESH_NAME in spec["dnsNames"] and "127.0.0.1" in spec["ipAddresses"], cert  # probes dial loopback
        assert {"server auth", "client auth"} <= set(spec["usages"]), cert
        assert spec["privateKey"]["rotationPolicy"] == "Always" and spec["renewBefore"], cert
    policy = parse_policy(configmaps["kvmesh-policy"]["data"]["policy.yaml"], "kvmesh-policy")
    used: set[str] = set()
    for obj in _workloads(objs):
        spec = pod_spec(obj)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec["containers"]:
            if not c["image"].startswith("kvmesh/kvmesh"):
                continue
            name, role = f"{obj['metadata']['name']}/{c['name']}", c["args"][0]
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            assert mounts[TLS_DIR]["readOnly"] is True, name
            secret = volumes[mounts[TLS_DIR]["name"]]["secret"]["secretName"]
            assert secret in by_secret, f"{name}: no Certificate makes Secret {secret}"
            used.add(secret)
            identity = by_secret[secret]["spec"]["commonName"]
            env = _container_env(c, configmaps)
            assert env["KVMESH_TLS_CERT"] == f"{TLS_DIR}/tls.crt" and env["KVMESH_TLS_KEY"] == f"{TLS_DIR}/tls.key"
            assert env["KVMESH_TLS_CA"] == f"{TLS_DIR}/ca.crt" and env["KVMESH_TLS_SERVER_NAME"] == MESH_NAME, name
            granted = policy.grants(Principal(identity, "certificate"))
            assert bool(granted) == (role != "metadata"), (name, identity)
            if role == "bench":
                continue  # a tool: it only dials
            assert env["KVMESH_TLS_REQUIRE_CLIENT_CERT"] == "true", name
            policy_dir, _, policy_file = env["KVMESH_SECURITY_POLICY"].rpartition("/")
            assert mounts[policy_dir]["readOnly"] is True, name
            assert volumes[mounts[policy_dir]["name"]]["configMap"]["name"] == "kvmesh-policy", name
            assert policy_file in configmaps["kvmesh-policy"]["data"], name
            member = env.get("KVMESH_MEMBER_ID", "")
            if member:  # registers under its pod name: the policy lets its identity register that name
                pod_name = f"{obj['metadata']['name']}-0"
                assert member == "$(POD_NAME)"
                assert any(g.registration and any(fnmatch.fnmatchcase(pod_name, m) for m in g.registration.members)
                           for g in granted), name
    assert used == set(by_secret) - ({"kvmesh-gateway-tls"} if overlay == "demo" else set()), used
    if overlay == "demo":  # Envoy presents kvmesh-gateway's certificate to the picker and checks the router's
        gateway = pod_spec(by_kind(objs, "Deployment")["kvmesh-gateway"])
        mounts = {m["mountPath"]: m for m in gateway["containers"][0]["volumeMounts"]}
        volumes = {v["name"]: v for v in gateway["volumes"]}
        assert volumes[mounts[TLS_DIR]["name"]]["secret"]["secretName"] == "kvmesh-gateway-tls"
        envoy = yaml.safe_load(configmaps["kvmesh-envoy"]["data"]["envoy.yaml"])
        picker = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "kvmesh_picker")
        tls = picker["transport_socket"]["typed_config"]["common_tls_context"]
        assert tls["tls_certificates"][0]["certificate_chain"]["filename"] == K8S_PICKER_TLS.cert
        assert K8S_PICKER_TLS.server_name in by_kind(objs, "Certificate")["kvmesh-router"]["spec"]["dnsNames"]
