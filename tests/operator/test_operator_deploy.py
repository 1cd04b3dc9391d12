"""The operator's manifests (CRD, least-privilege RBAC, Deployment) and its kopf glue."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import kopf
import pytest
import yaml

from kvmesh.services.operator import controller
from kvmesh.services.operator.reconcile import OWNED_KINDS, compute_status, plan
from kvmesh.services.operator.spec import GROUP, PLURAL
from kvmesh.tools.processes import kvmesh_env
from tests.deploy.k8s import K8S, KUBE_VERSIONS, by_kind, documents, render, validate_cli
from tests.operator.schema_tools import admit
from tests.operator.test_reconcile import NOW, as_server_returns, make_pool, observed

OPERATOR = K8S / "operator"
MANAGE = {"get", "list", "watch", "create", "update", "patch", "delete"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    text = render(OPERATOR)
    path = tmp_path_factory.mktemp("operator") / "operator.yaml"
    path.write_text(text)
    return path, documents(text)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_operator_kustomization_validates(rendered, version: str) -> None:
    path, objs = rendered
    done = validate_cli(path, version)
    assert done.returncode == 0, done.stdout + done.stderr
    assert {o["kind"] for o in objs} == {"Namespace", "CustomResourceDefinition", "ServiceAccount", "ClusterRole",
                                          "ClusterRoleBinding", "Deployment"}


def _grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"] for r in rule["resources"]
            for v in rule["verbs"]}


def test_rbac_is_least_privilege(rendered) -> None:
    _, objs = rendered
    grants = _grants(by_kind(objs, "ClusterRole")["kvmesh-operator"])
    assert not [g for g in grants if "*" in g], "no wildcards"
    # Exactly what a pool owns, fully managed...
    owned = set()
    for api_version, kind in OWNED_KINDS:
        group = api_version.rpartition("/")[0]
        resource = kind.lower() + "s"
        owned.add((group, resource))
        assert {(group, resource, v) for v in MANAGE} <= grants, kind
    # ...the pools themselves (never created or deleted by the operator), their status, events.
    assert {(GROUP, PLURAL, v) for v in ("get", "list", "watch", "patch")} <= grants
    assert (GROUP, PLURAL, "delete") not in grants and (GROUP, PLURAL, "create") not in grants
    assert {(GROUP, f"{PLURAL}/status", "patch"), ("", "events", "create")} <= grants
    mutating = {(g, r) for g, r, v in grants if v in ("create", "update", "patch", "delete")}
    assert mutating <= owned | {(GROUP, PLURAL), (GROUP, f"{PLURAL}/status"), ("", "events"),
                                ("events.k8s.io", "events")}
    assert not [g for g in grants if g[1] in ("secrets", "pods", "nodes")]
    # cert-manager: only the Certificates a pool owns (cert-manager writes the Secrets; issuers are
    # named, never made or changed, and no one's certificate requests are approved).
    assert {r for g, r, _ in grants if g == "cert-manager.io"} == {"certificates"}
    assert ("", "configmaps") in owned and ("cert-manager.io", "certificates") in owned


def test_binding_deployment_and_service_account_agree(rendered) -> None:
    _, objs = rendered
    binding = by_kind(objs, "ClusterRoleBinding")["kvmesh-operator"]
    deployment = by_kind(objs, "Deployment")["kvmesh-operator"]
    account = by_kind(objs, "ServiceAccount")["kvmesh-operator"]
    subject = binding["subjects"][0]
    assert subject["name"] == account["metadata"]["name"] == deployment["spec"]["template"]["spec"][
        "serviceAccountName"]
    assert subject["namespace"] == account["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["operator"] and container["image"] == "kvmesh/kvmesh:0.1.0"
    assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_computed_status_fits_the_crd_status_schema() -> None:
    crd = yaml.safe_load((OPERATOR / "crd.yaml").read_text())
    pool = make_pool()
    for objs in ([], observed(pool, 3), observed(pool, 1)):
        admit(crd, {**pool, "metadata": {"name": "pool-a"}, "status": compute_status(pool, objs, NOW)})
    bad = compute_status(pool, [], NOW, "spec.replicas: bad")
    admit(crd, {**pool, "metadata": {"name": "pool-a"}, "status": bad})


def test_handlers_are_registered_with_kopf() -> None:
    registry = kopf.get_default_registry()
    changing = [h for h in registry._changing.get_all_handlers() if h.id == "reconcile_pool"]
    assert {(h.reason, h.initial) for h in changing} == {
        (kopf.Reason.CREATE, None), (kopf.Reason.UPDATE, None), (None, True)}
    assert all(h.selector is not None and (h.selector.group, h.selector.any_name) == (GROUP, PLURAL)
               for h in changing)
    timers = [h for h in registry._spawning.get_all_handlers() if h.id == "refresh_status"]
    assert len(timers) == 1 and getattr(timers[0], "interval", None) == controller.STATUS_REFRESH_SECONDS
    settings = kopf.OperatorSettings()
    controller.configure(settings=settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)


class _InMemoryCluster:
    """Stands in for the API server in the glue test: stores applied objects by key."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.applied = 0

    def list_owned(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        k, v = label_selector.split("=")
        return [o for o in self.objects.values()
                if o["metadata"]["namespace"] == namespace and o["metadata"]["labels"].get(k) == v]

    def apply(self, obj: dict[str, Any]) -> None:
        self.applied += 1
        self.objects[(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])] = as_server_returns([obj])[0]

    def delete(self, obj: dict[str, Any]) -> None:
        del self.objects[(obj["apiVersion"], obj["kind"], obj["metadata"]["name"])]


def test_reconcile_handler_applies_the_plan_and_patches_status(monkeypatch: pytest.MonkeyPatch) -> None:
    """The glue only moves data: what it applies is the plan, what it patches is compute_status."""
    fake = _InMemoryCluster()
    monkeypatch.setattr(controller, "cluster", lambda: fake)
    logger = logging.getLogger("test.operator")
    pool = make_pool()
    patch = kopf.Patch()
    controller.reconcile_pool(body=pool, patch=patch, logger=logger)
    assert fake.applied == len(plan(pool, []).create) == 13
    assert patch["status"]["phase"] == "Progressing" and patch["status"]["observedGeneration"] == 1
    scaled = make_pool({"replicas": 1, "metadata": {"redis": {"address": "r:6379"}}}, generation=2)
    patch = kopf.Patch()
    controller.reconcile_pool(body=scaled, patch=patch, logger=logger)
    names = sorted(k[2] for k in fake.objects)
    assert "pool-a-etcd" not in names and "pool-a-cache" in names
    assert fake.objects[("apps/v1", "StatefulSet", "pool-a-cache")]["spec"]["replicas"] == 1
    bad = make_pool({"replicas": -4}, generation=3)
    before = dict(fake.objects)
    patch = kopf.Patch()
    controller.reconcile_pool(body=bad, patch=patch, logger=logger)
    assert fake.objects == before and patch["status"]["phase"] == "Failed"


def test_kvmesh_operator_command_reads_kvmesh_env() -> None:
    done = subprocess.run([sys.executable, "-m", "kvmesh", "operator", "--help"], capture_output=True, text=True,
                          env=kvmesh_env(), timeout=60)
    assert done.returncode == 0 and "KVMESH_NAMESPACES" in done.stdout and "KVMESH_LIVENESS_ENDPOINT" in done.stdout
    from kvmesh.services.operator.settings import OperatorSettings

    settings = OperatorSettings.model_validate({"namespaces": "a, b,,"})
    assert settings.namespace_list == ["a", "b"]
