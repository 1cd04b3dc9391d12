"""The pure reconcile: desired objects for a pool, plans against what exists, and status."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from kvmesh.services.operator.reconcile import OWNED_KINDS, compute_status, is_subset, key, plan
from kvmesh.services.operator.resources import POOL_LABEL, desired_objects, names
from kvmesh.services.operator.spec import API_VERSION, KIND, parse_spec
from tests.deploy import cert_manager
from tests.deploy.k8s import validate_objects

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "operator" / "examples"
UID = "7c0a2f5e-0000-4000-8000-000000000001"
NOW = "2026-01-01T00:00:00Z"
LATER = "2026-01-01T00:05:00Z"


def make_pool(spec: dict[str, Any] | None = None, name: str = "pool-a", generation: int = 1) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND,
            "metadata": {"name": name, "namespace": "inference", "uid": UID, "generation": generation},
            "spec": spec or {}}


def example(stem: str) -> dict[str, Any]:
    obj = yaml.safe_load((EXAMPLES / f"{stem}.yaml").read_text())
    obj["metadata"].update(uid=UID, generation=1)
    return dict(obj)


def as_server_returns(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a GET gives back after apply: the same fields plus server-side defaults and status."""
    out = []
    for obj in copy.deepcopy(objs):
        obj["metadata"].update(uid="child-uid", resourceVersion="42", generation=1,
                               creationTimestamp="2026-01-01T00:00:00Z")
        if obj["kind"] == "Service" and obj["spec"].get("clusterIP") != "None":
            obj["spec"]["clusterIP"] = "10.0.0.7"
            obj["spec"]["sessionAffinity"] = "None"
        if obj["kind"] in ("StatefulSet", "Deployment"):
            obj["spec"]["revisionHistoryLimit"] = 10
            obj["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
            obj["status"] = {"observedGeneration": 1}
        out.append(obj)
    return out


def validate_pool_objects(objs: list[dict[str, Any]]) -> None:
    """kubernetes-validate --strict for Kubernetes' kinds; cert-manager's against their own schemas, as
    tests/deploy does for the overlays (kubernetes-validate has none for them)."""
    validate_objects([o for o in objs if not cert_manager.is_cert_manager(o)])
    for obj in objs:
        if cert_manager.is_cert_manager(obj):
            cert_manager.validate(obj)


def find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name)


def container_env(obj: dict[str, Any]) -> dict[str, Any]:
    c = obj["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in c["env"]}


@pytest.mark.parametrize("stem", ["managed", "byo-etcd", "byo-redis", "plaintext"])
def test_every_produced_object_validates_strictly(stem: str) -> None:
    pool = example(stem)
    objs = desired_objects(pool, parse_spec(pool["spec"]))
    validate_pool_objects(objs)
    assert ("cert-manager.io/v1", "Certificate") in {(o["apiVersion"], o["kind"]) for o in objs} or stem == "plaintext"
    assert {(o["apiVersion"], o["kind"]) for o in objs} <= set(OWNED_KINDS)
    assert len({key(o) for o in objs}) == len(objs), "names must be unique per kind"
    for obj in objs:
        meta = obj["metadata"]
        assert meta["namespace"] == "inference" and meta["labels"][POOL_LABEL] == pool["metadata"]["name"]
        # Cleanup is the garbage collector's job: every object is controlled by the pool.
        assert meta["ownerReferences"] == [{"apiVersion": API_VERSION, "kind": KIND, "name": pool["metadata"]["name"],
                                            "uid": UID, "controller": True, "blockOwnerDeletion": True}]


def test_default_pool_objects() -> None:
    objs = desired_objects(make_pool(), parse_spec({}))
    n = names("pool-a")
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objs)
    assert kinds == sorted([
        ("Certificate", n["metadata"]), ("Certificate", n["cache"]), ("ConfigMap", n["policy"]),
        ("StatefulSet", n["etcd"]), ("Service", n["etcd_peer"]), ("Service", n["etcd"]),
        ("Deployment", n["metadata"]), ("Service", n["metadata"]), ("PodDisruptionBudget", n["metadata"]),
        ("StatefulSet", n["cache"]), ("Service", n["cache_headless"]), ("Service", n["cache"]),
        ("PodDisruptionBudget", n["cache"]),
    ])
    cache = find(objs, "StatefulSet", n["cache"])
    assert cache["spec"]["replicas"] == 3 and cache["spec"]["serviceName"] == n["cache_headless"]
    env = container_env(cache)
    assert env["KVMESH_METADATA"] == "pool-a-metadata.inference.svc:7400"
    assert env["KVMESH_ADVERTISE"] == "$(POD_NAME).pool-a-cache-headless.$(POD_NAMESPACE).svc:7500"
    assert env["KVMESH_STORAGE"] == "memory://?capacity=2GiB"
    # Requests sized from the memory tier: 2 GiB + headroom.
    resources = cache["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert resources == {"requests": {"cpu": "500m", "memory": "2560Mi"}, "limits": {"memory": "3072Mi"}}
    assert find(objs, "Service", n["cache_headless"])["spec"]["clusterIP"] == "None"
    assert container_env(find(objs, "Deployment", n["metadata"]))["KVMESH_BACKEND"] == (
        "etcd://pool-a-etcd:2379?prefix=/kvmesh")
    etcd = find(objs, "StatefulSet", n["etcd"])
    assert etcd["spec"]["replicas"] == 1
    assert "--initial-cluster=pool-a-etcd-0=http://pool-a-etcd-0.pool-a-etcd-peer.$(POD_NAMESPACE).svc:2380" in (
        etcd["spec"]["template"]["spec"]["containers"][0]["command"])


def test_managed_three_member_etcd_and_scheduler() -> None:
    pool = example("managed")
    objs = desired_objects(pool, parse_spec(pool["spec"]))
    etcd = find(objs, "StatefulSet", "pool-a-etcd")
    cluster = next(a for a in etcd["spec"]["template"]["spec"]["containers"][0]["command"]
                   if a.startswith("--initial-cluster="))
    assert cluster.count("=http://") == 3
    assert find(objs, "PodDisruptionBudget", "pool-a-etcd")["spec"]["minAvailable"] == 2
    cache = find(objs, "StatefulSet", "pool-a-cache")
    pod = cache["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    term = pod["affinity"]["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
    assert term["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": "vllm-llama3-8b"}
    # The disk tier gets a claim of the requested size, mounted at its path.
    assert cache["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"] == "120Gi"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["disk-0"] == "/data"
    assert pod["containers"][0]["resources"]["requests"] == {"cpu": "2", "memory": "10Gi"}


def test_disk_tier_without_storage_uses_emptydir() -> None:
    spec = parse_spec({"cache": {"engine": "memory://?capacity=1GiB,disk:///var/cache/kv?capacity=5GiB"}})
    cache = find(desired_objects(make_pool(), spec), "StatefulSet", "pool-a-cache")
    assert "volumeClaimTemplates" not in cache["spec"]
    pod = cache["spec"]["template"]["spec"]
    assert {"name": "disk-0", "emptyDir": {}} in pod["volumes"]
    assert {"name": "disk-0", "mountPath": "/var/cache/kv"} in pod["containers"][0]["volumeMounts"]


def test_bring_your_own_backends() -> None:
    etcd_pool = example("byo-etcd")
    objs = desired_objects(etcd_pool, parse_spec(etcd_pool["spec"]))
    assert not [o for o in objs if "etcd" in o["metadata"]["name"]]
    assert container_env(find(objs, "Deployment", "pool-b-metadata"))["KVMESH_BACKEND"] == (
        "etcd://etcd-0.etcd.infra.svc:2379,etcd-1.etcd.infra.svc:2379,etcd-2.etcd.infra.svc:2379?prefix=/kvmesh/pool-b")
    redis_pool = example("byo-redis")
    objs = desired_objects(redis_pool, parse_spec(redis_pool["spec"]))
    metadata = find(objs, "Deployment", "pool-c-metadata")
    env = metadata["spec"]["template"]["spec"]["containers"][0]["env"]
    order = [e["name"] for e in env]
    assert order.index("KVMESH_REDIS_PASSWORD") < order.index("KVMESH_BACKEND")
    assert env[order.index("KVMESH_REDIS_PASSWORD")]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "password"}}
    assert container_env(metadata)["KVMESH_BACKEND"] == "redis://:$(KVMESH_REDIS_PASSWORD)@redis.infra.svc:6379/2"
    assert find(objs, "Service", "pool-c-cache")["spec"]["type"] == "LoadBalancer"
    # Two cache nodes still get a budget; the password never appears in any object.
    assert "PodDisruptionBudget" in {o["kind"] for o in objs}
    no_secret = make_pool({"metadata": {"redis": {"address": "r:6379"}}})
    env = container_env(find(desired_objects(no_secret, parse_spec(no_secret["spec"])), "Deployment",
                             "pool-a-metadata"))
    assert env["KVMESH_BACKEND"] == "redis://r:6379/0" and "KVMESH_REDIS_PASSWORD" not in env


def test_first_reconcile_creates_everything_then_nothing_to_do() -> None:
    pool = make_pool()
    first = plan(pool, [])
    assert first.error is None and len(first.create) == 13 and not first.update and not first.delete
    again = plan(pool, as_server_returns(first.create))
    assert not again.changed and len(again.unchanged) == 13


def test_scale_up_and_down() -> None:
    pool = make_pool({"replicas": 3})
    existing = as_server_returns(plan(pool, []).create)
    up = plan(make_pool({"replicas": 5}, generation=2), existing)
    assert [key(o) for o in up.update] == [("apps/v1", "StatefulSet", "pool-a-cache")]
    assert up.update[0]["spec"]["replicas"] == 5 and not up.create and not up.delete
    # Down to one: the StatefulSet shrinks and its disruption budget (meaningless for one pod) goes.
    down = plan(make_pool({"replicas": 1}, generation=3), existing)
    assert [key(o) for o in down.update] == [("apps/v1", "StatefulSet", "pool-a-cache")]
    assert [key(o) for o in down.delete] == [("policy/v1", "PodDisruptionBudget", "pool-a-cache")]
    zero = plan(make_pool({"replicas": 0}, generation=4), existing)
    assert zero.update[0]["spec"]["replicas"] == 0


def test_spec_changes_roll_the_right_objects() -> None:
    pool = make_pool()
    existing = as_server_returns(plan(pool, []).create)
    new_engine = plan(make_pool({"cache": {"engine": "memory://?capacity=4GiB"}}), existing)
    # The cache nodes roll; the policy's capacity bound follows the new tier (no rollout for that).
    assert [key(o)[1:] for o in new_engine.update] == [("ConfigMap", "pool-a-policy"), ("StatefulSet", "pool-a-cache")]
    assert container_env(new_engine.update[1])["KVMESH_STORAGE"] == "memory://?capacity=4GiB"
    assert '"max_capacity_bytes": 4294967296' in new_engine.update[0]["data"]["policy.yaml"]
    new_image = plan(make_pool({"cache": {"image": "kvmesh/kvmesh:0.2.0"}}), existing)
    assert sorted(key(o)[2] for o in new_image.update) == ["pool-a-cache", "pool-a-metadata"]
    new_port = plan(make_pool({"service": {"type": "NodePort", "port": 7501}}), existing)
    assert [key(o) for o in new_port.update] == [("v1", "Service", "pool-a-cache")]


def test_switching_backend_removes_the_managed_etcd() -> None:
    pool = make_pool()
    existing = as_server_returns(plan(pool, []).create)
    switched = plan(make_pool({"metadata": {"redis": {"address": "redis.infra:6379"}}}), existing)
    assert sorted(key(o)[2] for o in switched.delete) == ["pool-a-etcd", "pool-a-etcd", "pool-a-etcd-peer"]
    assert [key(o)[2] for o in switched.update] == ["pool-a-metadata"]


def test_foreign_objects_are_never_touched() -> None:
    pool = make_pool()
    stranger = as_server_returns(plan(make_pool(name="pool-a"), []).create)
    for obj in stranger:
        obj["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    # Labelled like ours but controlled by another owner: not deleted...
    leftover = [o for o in stranger if o["metadata"]["name"] == "pool-a-etcd-peer"]
    result = plan(make_pool({"metadata": {"redis": {"address": "r:6379"}}}), leftover)
    assert result.error is None and not result.delete
    # ...and a name clash with an object we do not own stops the reconcile instead of hijacking it.
    clash = plan(pool, stranger)
    assert clash.error and "not owned by this pool" in clash.error and not clash.apply and not clash.delete


def test_tier_list_with_a_redis_cluster_host_list_is_accepted() -> None:
    """The operator splits tiers like the cache node: the comma between cluster hosts is not a tier."""
    tiers = "memory://?capacity=1GiB,redis+cluster://h1:7000,h2:7001"
    result = plan(make_pool({"cache": {"engine": tiers}}), [])
    assert result.error is None and result.spec is not None
    assert result.spec.cache.tiers == ["memory://?capacity=1GiB", "redis+cluster://h1:7000,h2:7001"]
    cache = find(result.create, "StatefulSet", names("pool-a")["cache"])
    assert container_env(cache)["KVMESH_STORAGE"] == tiers


def test_invalid_spec_changes_nothing() -> None:
    pool = make_pool()
    existing = as_server_returns(plan(pool, []).create)
    bad = plan(make_pool({"cache": {"engine": "tape:///dev/st0"}}), existing)
    assert bad.spec is None and bad.error and "unknown storage scheme" in bad.error
    assert not bad.apply and not bad.delete
    status = compute_status(make_pool({"cache": {"engine": "tape://"}}), existing, NOW, bad.error, bad.error_reason)
    assert status["phase"] == "Failed"
    assert status["conditions"][0]["reason"] == "InvalidSpec" and "tape" in status["conditions"][0]["message"]


def test_status_of_a_nonsense_spec_does_not_raise() -> None:
    for spec in ({"replicas": "many"}, {"replicas": -2}, {"replicas": True}):
        pool = make_pool(spec)
        result = plan(pool, [])
        assert result.error
        status = compute_status(pool, [], NOW, result.error)
        assert status["phase"] == "Failed" and status["replicas"] == 0


def test_is_subset_semantics() -> None:
    assert is_subset({"a": 1, "b": {"c": [1, {"d": 2}]}}, {"a": 1, "x": 0, "b": {"c": [1, {"d": 2, "e": 3}]}})
    assert not is_subset({"a": [1, 2]}, {"a": [1]})
    assert not is_subset({"a": {"b": 1}}, {"a": {"b": 2}})
    assert is_subset({"cpu": "2"}, {"cpu": 2}) and not is_subset({"x": True}, {"x": "True"})


# --- status ---------------------------------------------------------------------------------------

def observed(pool: dict[str, Any], cache_ready: int, metadata_ready: int = 2, etcd_ready: int = 1,
             rolled: bool = True, replicas: int = 3) -> list[dict[str, Any]]:
    objs = as_server_returns(plan(pool, []).create)
    for obj in objs:
        if obj["kind"] not in ("StatefulSet", "Deployment"):
            continue
        name = obj["metadata"]["name"]
        want = obj["spec"]["replicas"]
        ready = {"pool-a-cache": cache_ready, "pool-a-metadata": metadata_ready, "pool-a-etcd": etcd_ready}[name]
        obj["status"] = {"observedGeneration": 1 if rolled else 0, "replicas": want, "readyReplicas": ready,
                         "updatedReplicas": want, "currentRevision": "r1", "updateRevision": "r1"}
    return objs


def test_status_phases() -> None:
    pool = make_pool()
    assert compute_status(pool, [], NOW)["phase"] == "Pending"
    assert compute_status(pool, observed(pool, 0, rolled=False), NOW)["phase"] == "Progressing"
    ready = compute_status(pool, observed(pool, 3), NOW)
    assert ready["phase"] == "Ready" and ready["readyReplicas"] == 3 and ready["replicas"] == 3
    assert ready["observedGeneration"] == 1
    assert ready["selector"] == ("app.kubernetes.io/name=kvmesh,app.kubernetes.io/instance=pool-a,"
                                 "app.kubernetes.io/component=cachenode")
    assert {c["type"]: c["status"] for c in ready["conditions"]} == {
        "Ready": "True", "MetadataAvailable": "True", "Progressing": "False"}
    degraded = compute_status(pool, observed(pool, 2), NOW)
    assert degraded["phase"] == "Degraded" and degraded["conditions"][0]["reason"] == "ReplicasNotReady"
    no_etcd = compute_status(pool, observed(pool, 3, etcd_ready=0), NOW)
    assert no_etcd["phase"] == "Degraded"
    assert no_etcd["conditions"][1] | {"lastTransitionTime": None} == {
        "type": "MetadataAvailable", "status": "False", "reason": "EtcdUnavailable",
        "message": "the managed etcd has no ready member", "lastTransitionTime": None, "observedGeneration": 1}


def test_status_rolling_update_is_progressing() -> None:
    pool = make_pool()
    objs = observed(pool, 3)
    cache = find(objs, "StatefulSet", "pool-a-cache")
    cache["status"].update(updateRevision="r2", updatedReplicas=1)
    assert compute_status(pool, objs, NOW)["phase"] == "Progressing"


def test_transition_times_move_only_on_change() -> None:
    pool = make_pool()
    first = compute_status(pool, observed(pool, 3), NOW)
    pool["status"] = first
    same = compute_status(pool, observed(pool, 3), LATER)
    assert [c["lastTransitionTime"] for c in same["conditions"]] == [NOW, NOW, NOW]
    flipped = compute_status(pool, observed(pool, 1), LATER)
    times = {c["type"]: c["lastTransitionTime"] for c in flipped["conditions"]}
    assert times == {"Ready": LATER, "MetadataAvailable": NOW, "Progressing": NOW}
