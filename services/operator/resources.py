"""Pure functions from a KVCachePool to the Kubernetes objects it should own.

No API calls here: given the pool (as the API server returns it) this builds every object
the pool needs — the cache-node StatefulSet with its headless and client Services, the
kvmesh metadata Deployment and Service, the managed etcd when asked for, and their
PodDisruptionBudgets — each labelled with the pool and owned by it (ownerReferences with
controller=true), so deleting the pool lets the garbage collector delete them all.
"""

from __future__ import annotations

from typing import Any

from kvmesh.services.operator.spec import API_VERSION, KIND, PoolSpec

Obj = dict[str, Any]

POOL_LABEL = "kvcache.kvmesh.io/pool"
MANAGED_BY = "kvmesh-operator"
CACHE_PORT = 7500
METADATA_PORT = 7400
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
ETCD_METRICS_PORT = 2381
RUN_AS = 10001
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
WORKLOAD_LABEL = "app.kubernetes.io/name"


def names(pool_name: str) -> dict[str, str]:
    """Every object name a pool owns, in one place."""
    return {
        "cache": f"{pool_name}-cache",
        "cache_headless": f"{pool_name}-cache-headless",
        "metadata": f"{pool_name}-metadata",
        "etcd": f"{pool_name}-etcd",
        "etcd_peer": f"{pool_name}-etcd-peer",
    }


def selector_labels(pool_name: str, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "kvmesh", "app.kubernetes.io/instance": pool_name,
            "app.kubernetes.io/component": component}


def labels(pool_name: str, component: str) -> dict[str, str]:
    return {**selector_labels(pool_name, component), "app.kubernetes.io/managed-by": MANAGED_BY,
            POOL_LABEL: pool_name}


def owner_reference(pool: Obj) -> Obj:
    meta = pool["metadata"]
    return {"apiVersion": API_VERSION, "kind": KIND, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


def _meta(pool: Obj, name: str, component: str) -> Obj:
    return {"name": name, "namespace": pool["metadata"]["namespace"],
            "labels": labels(pool["metadata"]["name"], component), "ownerReferences": [owner_reference(pool)]}


def _pod_security() -> Obj:
    return {"runAsNonRoot": True, "runAsUser": RUN_AS, "runAsGroup": RUN_AS, "fsGroup": RUN_AS,
            "fsGroupChangePolicy": "OnRootMismatch", "seccompProfile": {"type": "RuntimeDefault"}}


def _container_security() -> Obj:
    return {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]}}


def _grpc_probes(port: int) -> Obj:
    return {
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {"grpc": {"port": port}, "periodSeconds": 5, "timeoutSeconds": 3},
        "livenessProbe": {"grpc": {"port": port}, "periodSeconds": 10, "timeoutSeconds": 5, "failureThreshold": 3},
    }


def _spread(pool_name: str, component: str, hard: bool) -> list[Obj]:
    match = {"matchLabels": selector_labels(pool_name, component)}
    return [
        {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname",
         "whenUnsatisfiable": "DoNotSchedule" if hard else "ScheduleAnyway", "labelSelector": match},
        {"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone", "whenUnsatisfiable": "ScheduleAnyway",
         "labelSelector": match},
    ]


def _env(**values: str) -> list[Obj]:
    return [{"name": k, "value": v} for k, v in values.items()]


def _field_env(name: str, path: str) -> Obj:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def _tmp_volume() -> tuple[Obj, Obj]:
    return {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}}, {"name": "tmp", "mountPath": "/tmp"}


def _pdb(pool: Obj, name: str, component: str, **budget: int) -> Obj:
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": _meta(pool, name, component),
            "spec": {**budget, "selector": {"matchLabels": selector_labels(pool["metadata"]["name"], component)}}}


# --- metadata backend -------------------------------------------------------------------------

def metadata_backend_env(pool: Obj, spec: PoolSpec) -> list[Obj]:
    """KVMESH_BACKEND for the metadata pods (a Redis password comes from its Secret, never inline)."""
    md, n = spec.metadata, names(pool["metadata"]["name"])
    if md.managed is not None:
        return _env(KVMESH_BACKEND=f"etcd://{n['etcd']}:{ETCD_CLIENT_PORT}?prefix=/kvmesh")
    if md.etcd is not None:
        return _env(KVMESH_BACKEND=f"etcd://{','.join(md.etcd.endpoints)}?prefix={md.etcd.prefix}")
    assert md.redis is not None
    ref = md.redis.password_secret_ref
    if ref is None:
        return _env(KVMESH_BACKEND=f"redis://{md.redis.address}/{md.redis.db}")
    return [
        {"name": "KVMESH_REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}},
        {"name": "KVMESH_BACKEND", "value": f"redis://:$(KVMESH_REDIS_PASSWORD)@{md.redis.address}/{md.redis.db}"},
    ]


def metadata_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    pool_name, n = pool["metadata"]["name"], names(pool["metadata"]["name"])
    tmp_volume, tmp_mount = _tmp_volume()
    container = {
        "name": "metadata",
        "image": spec.cache.image,
        "imagePullPolicy": spec.cache.image_pull_policy,
        "args": ["metadata"],
        "env": [
            _field_env("POD_IP", "status.podIP"),
            *_env(KVMESH_LISTEN=f"0.0.0.0:{METADATA_PORT}", KVMESH_ADVERTISE=f"$(POD_IP):{METADATA_PORT}",
                  KVMESH_LOG_FORMAT="json"),
            *metadata_backend_env(pool, spec),
        ],
        "ports": [{"name": "grpc", "containerPort": METADATA_PORT, "protocol": "TCP"}],
        **_grpc_probes(METADATA_PORT),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount],
    }
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(pool, n["metadata"], "metadata"),
        "spec": {
            "replicas": spec.metadata.replicas,
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "selector": {"matchLabels": selector_labels(pool_name, "metadata")},
            "template": {
                "metadata": {"labels": labels(pool_name, "metadata")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "topologySpreadConstraints": _spread(pool_name, "metadata", hard=False),
                    "containers": [container],
                    "volumes": [tmp_volume],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(pool, n["metadata"], "metadata"),
        "spec": {"type": "ClusterIP", "selector": selector_labels(pool_name, "metadata"),
                 "ports": [{"name": "grpc", "port": METADATA_PORT, "targetPort": "grpc", "protocol": "TCP",
                            "appProtocol": "grpc"}]},
    }
    out = [deployment, service]
    if spec.metadata.replicas > 1:
        out.append(_pdb(pool, n["metadata"], "metadata", minAvailable=1))
    return out


def etcd_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    """A managed etcd (1 or 3 members) that only this pool's metadata service talks to."""
    managed = spec.metadata.managed
    if managed is None:
        return []
    pool_name, n = pool["metadata"]["name"], names(pool["metadata"]["name"])
    peer = f"$(POD_NAMESPACE).svc:{ETCD_PEER_PORT}"
    cluster = ",".join(f"{n['etcd']}-{i}=http://{n['etcd']}-{i}.{n['etcd_peer']}.{peer}"
                       for i in range(managed.replicas))
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(pool, n["etcd"], "etcd"),
        "spec": {
            "serviceName": n["etcd_peer"],
            "replicas": managed.replicas,
            "podManagementPolicy": "Parallel",
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Retain"},
            "selector": {"matchLabels": selector_labels(pool_name, "etcd")},
            "template": {
                "metadata": {"labels": labels(pool_name, "etcd")},
                "spec": {
                    "automountServiceAccountToken": False,
                    "securityContext": _pod_security(),
                    "topologySpreadConstraints": _spread(pool_name, "etcd", hard=False),
                    "containers": [{
                        "name": "etcd",
                        "image": managed.image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": [
                            "etcd", "--name=$(POD_NAME)", "--data-dir=/var/lib/etcd",
                            f"--listen-client-urls=http://0.0.0.0:{ETCD_CLIENT_PORT}",
                            f"--advertise-client-urls=http://$(POD_NAME).{n['etcd_peer']}."
                            f"$(POD_NAMESPACE).svc:{ETCD_CLIENT_PORT}",
                            f"--listen-peer-urls=http://0.0.0.0:{ETCD_PEER_PORT}",
                            f"--initial-advertise-peer-urls=http://$(POD_NAME).{n['etcd_peer']}.{peer}",
                            f"--initial-cluster={cluster}",
                            "--initial-cluster-state=new",
                            f"--initial-cluster-token={pool_name}-etcd",
                            f"--listen-metrics-urls=http://0.0.0.0:{ETCD_METRICS_PORT}",
                            "--auto-compaction-retention=1h",
                        ],
                        "env": [_field_env("POD_NAME", "metadata.name"),
                                _field_env("POD_NAMESPACE", "metadata.namespace")],
                        "ports": [{"name": "client", "containerPort": ETCD_CLIENT_PORT},
                                  {"name": "peer", "containerPort": ETCD_PEER_PORT},
                                  {"name": "metrics", "containerPort": ETCD_METRICS_PORT}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "metrics"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/livez", "port": "metrics"},
                                          "initialDelaySeconds": 15, "periodSeconds": 10, "failureThreshold": 5},
                        "resources": {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "1Gi"}},
                        "securityContext": _container_security(),
                        "volumeMounts": [{"name": "data", "mountPath": "/var/lib/etcd"}],
                    }],
                },
            },
            "volumeClaimTemplates": [{
                "metadata": {"name": "data", "labels": labels(pool_name, "etcd")},
                "spec": {"accessModes": ["ReadWriteOnce"],
                         "resources": {"requests": {"storage": str(managed.storage)}}},
            }],
        },
    }
    peer_service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(pool, n["etcd_peer"], "etcd"),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": selector_labels(pool_name, "etcd"),
                 "ports": [{"name": "client", "port": ETCD_CLIENT_PORT}, {"name": "peer", "port": ETCD_PEER_PORT}]},
    }
    client_service = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(pool, n["etcd"], "etcd"),
        "spec": {"type": "ClusterIP", "selector": selector_labels(pool_name, "etcd"),
                 "ports": [{"name": "client", "port": ETCD_CLIENT_PORT, "targetPort": "client"}]},
    }
    out = [statefulset, peer_service, client_service]
    if managed.replicas == 3:
        out.append(_pdb(pool, n["etcd"], "etcd", minAvailable=2))
    return out


# --- cache nodes ---------------------------------------------------------------------------------

def _cache_resources(spec: PoolSpec) -> Obj:
    """The spec's resources, else requests sized from the memory tiers' capacity."""
    given = spec.cache.resources
    if given is not None and (given.requests or given.limits):
        out: Obj = {}
        if given.requests:
            out["requests"] = {k: str(v) for k, v in given.requests.items()}
        if given.limits:
            out["limits"] = {k: str(v) for k, v in given.limits.items()}
        return out
    mib = spec.cache.memory_bytes() // (1024 * 1024)
    return {"requests": {"cpu": "500m", "memory": f"{mib + 512}Mi"}, "limits": {"memory": f"{mib + 1024}Mi"}}


def _affinity(spec: PoolSpec) -> Obj | None:
    workload = spec.scheduler.affinity_workload
    if not workload:
        return None
    # Preferred, not required: a pool must still schedule while its workload scales from zero.
    return {"podAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100,
        "podAffinityTerm": {"labelSelector": {"matchLabels": {WORKLOAD_LABEL: workload}},
                            "topologyKey": "kubernetes.io/hostname"},
    }]}}


def cache_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    pool_name, ns, n = pool["metadata"]["name"], pool["metadata"]["namespace"], names(pool["metadata"]["name"])
    tmp_volume, tmp_mount = _tmp_volume()
    mounts, volumes, claims = [tmp_mount], [tmp_volume], []
    for i, path in enumerate(spec.cache.disk_paths()):
        volume = f"disk-{i}"
        mounts.append({"name": volume, "mountPath": path})
        if spec.cache.storage is not None:
            claim_spec: Obj = {"accessModes": ["ReadWriteOnce"],
                               "resources": {"requests": {"storage": str(spec.cache.storage.size)}}}
            if spec.cache.storage.storage_class_name:
                claim_spec["storageClassName"] = spec.cache.storage.storage_class_name
            claims.append({"metadata": {"name": volume, "labels": labels(pool_name, "cachenode")},
                           "spec": claim_spec})
        else:
            volumes.append({"name": volume, "emptyDir": {}})
    container = {
        "name": "cachenode",
        "image": spec.cache.image,
        "imagePullPolicy": spec.cache.image_pull_policy,
        "args": ["cachenode"],
        "env": [
            _field_env("POD_NAME", "metadata.name"),
            _field_env("POD_NAMESPACE", "metadata.namespace"),
            *_env(
                KVMESH_LISTEN=f"0.0.0.0:{CACHE_PORT}",
                KVMESH_MEMBER_ID="$(POD_NAME)",
                KVMESH_ADVERTISE=f"$(POD_NAME).{n['cache_headless']}.$(POD_NAMESPACE).svc:{CACHE_PORT}",
                KVMESH_METADATA=f"{n['metadata']}.{ns}.svc:{METADATA_PORT}",
                KVMESH_STORAGE=spec.cache.engine,
                KVMESH_LOG_FORMAT="json",
            ),
        ],
        "ports": [{"name": "grpc", "containerPort": CACHE_PORT, "protocol": "TCP"}],
        **_grpc_probes(CACHE_PORT),
        "resources": _cache_resources(spec),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": _pod_security(),
        "topologySpreadConstraints": _spread(pool_name, "cachenode", hard=False),
        "containers": [container],
        "volumes": volumes,
    }
    if spec.scheduler.gpu_type:
        pod_spec["nodeSelector"] = {GPU_PRODUCT_LABEL: spec.scheduler.gpu_type}
    affinity = _affinity(spec)
    if affinity:
        pod_spec["affinity"] = affinity
    statefulset: Obj = {
        "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(pool, n["cache"], "cachenode"),
        "spec": {
            "serviceName": n["cache_headless"],
            "replicas": spec.replicas,
            "podManagementPolicy": "Parallel",
            "updateStrategy": {"type": "RollingUpdate"},
            # A cache: a scaled-away node's data is not worth keeping.
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete", "whenScaled": "Delete"},
            "selector": {"matchLabels": selector_labels(pool_name, "cachenode")},
            "template": {"metadata": {"labels": labels(pool_name, "cachenode")}, "spec": pod_spec},
        },
    }
    if claims:
        statefulset["spec"]["volumeClaimTemplates"] = claims
    headless = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(pool, n["cache_headless"], "cachenode"),
        "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                 "selector": selector_labels(pool_name, "cachenode"),
                 "ports": [{"name": "grpc", "port": CACHE_PORT, "targetPort": "grpc", "appProtocol": "grpc"}]},
    }
    client = {
        "apiVersion": "v1", "kind": "Service", "metadata": _meta(pool, n["cache"], "cachenode"),
        "spec": {"type": spec.service.type, "selector": selector_labels(pool_name, "cachenode"),
                 "ports": [{"name": "grpc", "port": spec.service.port, "targetPort": "grpc", "protocol": "TCP",
                            "appProtocol": "grpc"}]},
    }
    out = [statefulset, headless, client]
    if spec.replicas > 1:
        out.append(_pdb(pool, n["cache"], "cachenode", maxUnavailable=1))
    return out


def desired_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    """Everything the pool should own, in apply order (backend first, cache nodes last)."""
    return [*etcd_objects(pool, spec), *metadata_objects(pool, spec), *cache_objects(pool, spec)]

