"""Pure functions from a KVCachePool to the Kubernetes objects it should own.

No API calls here: given the pool (as the API server returns it) this builds every object
the pool needs — the cache-node StatefulSet with its headless and client Services, the
kvmesh metadata Deployment and Service, the managed etcd when asked for, and their
PodDisruptionBudgets; unless the spec opts out (`tls.enabled: false`), a cert-manager
`Certificate` per kvmesh workload and the pool's policy ConfigMap, which every kvmesh pod mounts
(mutual TLS, the policy enforced, probes over mutual TLS) — each labelled with the pool and owned
by it (ownerReferences with controller=true), so deleting the pool lets the garbage collector
delete them all (the certificate Secrets are cert-manager's: docs/deploy.md).
"""

from __future__ import annotations

import json
from typing import Any

from kvmesh.services.operator.spec import API_VERSION, KIND, PoolSpec
from kvmesh.uri import parse_uri

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
# Where pods find their certificate Secret and the policy, and the name every certificate carries
# (pods are dialled by IP or per-pod DNS names; clients expect this one), as in deploy/k8s/base.
TLS_DIR = "/etc/kvmesh/tls"
POLICY_DIR = "/etc/kvmesh/policy"
POLICY_FILE = "policy.yaml"
MESH_NAME = "kvmesh-mesh"
ADMIN_PRINCIPAL = "kvmesh-admin"
HEALTH_COMMAND = ["kvmesh", "health", "--quiet"]


def names(pool_name: str) -> dict[str, str]:
    """Every object name a pool owns, in one place."""
    return {
        "cache": f"{pool_name}-cache",
        "cache_headless": f"{pool_name}-cache-headless",
        "metadata": f"{pool_name}-metadata",
        "etcd": f"{pool_name}-etcd",
        "etcd_peer": f"{pool_name}-etcd-peer",
        "metadata_tls": f"{pool_name}-metadata-tls",
        "cache_tls": f"{pool_name}-cache-tls",
        "policy": f"{pool_name}-policy",
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


def _exec_probes() -> Obj:
    """`kvmesh health` in the container: it dials its own KVMESH_LISTEN port over mutual TLS with the
    pod's certificate (a kubelet `grpc:` probe cannot present a client certificate)."""
    run = {"exec": {"command": list(HEALTH_COMMAND)}, "timeoutSeconds": 5}
    return {
        "startupProbe": {**run, "periodSeconds": 2, "failureThreshold": 60},
        "readinessProbe": {**run, "periodSeconds": 5},
        "livenessProbe": {**run, "periodSeconds": 10, "failureThreshold": 3},
    }


def _probes(spec: PoolSpec, port: int) -> Obj:
    return _exec_probes() if spec.tls.enabled else _grpc_probes(port)


def _tls_env() -> list[Obj]:
    return _env(
        KVMESH_TLS_CERT=f"{TLS_DIR}/tls.crt",
        KVMESH_TLS_KEY=f"{TLS_DIR}/tls.key",
        KVMESH_TLS_CA=f"{TLS_DIR}/ca.crt",
        KVMESH_TLS_REQUIRE_CLIENT_CERT="true",
        KVMESH_TLS_SERVER_NAME=MESH_NAME,
        KVMESH_SECURITY_POLICY=f"{POLICY_DIR}/{POLICY_FILE}",
    )


def _secure(pool: Obj, spec: PoolSpec, container: Obj, volumes: list[Obj], secret: str) -> None:
    """Mounts the workload's certificate Secret and the pool's policy, and points KVMESH_TLS_* at them."""
    if not spec.tls.enabled:
        return
    container["env"] = [*container["env"], *_tls_env()]
    container["volumeMounts"] = [{"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
                                 {"name": "policy", "mountPath": POLICY_DIR, "readOnly": True},
                                 *container["volumeMounts"]]
    volumes[:0] = [{"name": "tls", "secret": {"secretName": secret}},
                   {"name": "policy", "configMap": {"name": names(pool["metadata"]["name"])["policy"]}}]


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
        **_probes(spec, METADATA_PORT),
        "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}, "limits": {"memory": "512Mi"}},
        "securityContext": _container_security(),
        "volumeMounts": [tmp_mount],
    }
    volumes = [tmp_volume]
    _secure(pool, spec, container, volumes, n["metadata_tls"])
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
                    "volumes": volumes,
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
        **_probes(spec, CACHE_PORT),
        "resources": _cache_resources(spec),
        "securityContext": _container_security(),
        "volumeMounts": mounts,
    }
    _secure(pool, spec, container, volumes, n["cache_tls"])
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


# --- mutual TLS and the policy ----------------------------------------------------------------

def _hosts(service: str, namespace: str) -> list[str]:
    return [service, f"{service}.{namespace}", f"{service}.{namespace}.svc", f"{service}.{namespace}.svc.cluster.local"]


def _certificate(pool: Obj, spec: PoolSpec, name: str, secret: str, component: str, dns_names: list[str]) -> Obj:
    issuer = spec.tls.issuer_ref
    return {
        "apiVersion": "cert-manager.io/v1", "kind": "Certificate", "metadata": _meta(pool, name, component),
        "spec": {
            "secretName": secret,
            # The identity the policy grants to (all pods of a workload share it).
            "commonName": name,
            "dnsNames": [MESH_NAME, *dns_names, "localhost"],
            "ipAddresses": ["127.0.0.1"],  # the exec probes dial loopback
            "usages": ["digital signature", "key encipherment", "server auth", "client auth"],
            "duration": "2160h",  # 90 days, renewed 30 days ahead; kvmesh re-reads the files
            "renewBefore": "720h",
            "privateKey": {"algorithm": "ECDSA", "size": 256, "rotationPolicy": "Always"},
            "issuerRef": {"group": issuer.group, "kind": issuer.kind, "name": issuer.name},
        },
    }


def certificate_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    """One cert-manager Certificate per kvmesh workload, from the spec's issuer (none when TLS is off)."""
    if not spec.tls.enabled:
        return []
    ns, n = pool["metadata"]["namespace"], names(pool["metadata"]["name"])
    headless = [f"*.{n['cache_headless']}.{ns}.svc", f"*.{n['cache_headless']}.{ns}.svc.cluster.local"]
    return [
        _certificate(pool, spec, n["metadata"], n["metadata_tls"], "metadata", _hosts(n["metadata"], ns)),
        _certificate(pool, spec, n["cache"], n["cache_tls"], "cachenode", [*headless, *_hosts(n["cache"], ns)]),
    ]


def _largest_tier(spec: PoolSpec) -> int | None:
    """The cache node's registered capacity bound: its largest tier, or None when a tier has no capacity."""
    sizes = [parse_uri(t).size_param("capacity", 0) for t in spec.cache.tiers]
    return max(sizes) if sizes and all(sizes) else None


def pool_policy(pool_name: str, spec: PoolSpec) -> Obj:
    """The pool's policy (docs/security.md schema): least privilege per workload identity.

    The metadata service calls no one and is granted nothing; the cache nodes may register only
    their own StatefulSet's pod names (ordinals), only as cache nodes, with at most the largest tier; a
    `kvmesh-admin` certificate (issued on demand, never by the operator) is admin. The spec's
    `policy.principals` (the pool's clients) are added; they cannot replace these entries.
    """
    n = names(pool_name)
    registration: Obj = {"roles": ["cachenode"], "members": [f"{n['cache']}-[0-9]*"]}  # StatefulSet ordinals
    bound = _largest_tier(spec)
    if bound is not None:
        registration["max_capacity_bytes"] = bound
    own: Obj = {n["cache"]: {"register": registration}, ADMIN_PRINCIPAL: {"admin": True}}
    clients = dict(spec.policy.principals) if spec.policy is not None else {}
    return {"principals": {**{k: v for k, v in clients.items() if k not in own and k != n["metadata"]}, **own}}


def policy_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    """The policy ConfigMap every kvmesh pod of the pool mounts (none when TLS is off).

    The file is JSON (which is YAML) so the operator needs no YAML writer; an edit reaches running
    pods without a restart (the kubelet updates the file; the services re-read it).
    """
    if not spec.tls.enabled:
        return []
    pool_name = pool["metadata"]["name"]
    text = json.dumps(pool_policy(pool_name, spec), indent=2, sort_keys=True) + "\n"
    return [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(pool, names(pool_name)["policy"], "policy"),
             "data": {POLICY_FILE: text}}]


def desired_objects(pool: Obj, spec: PoolSpec) -> list[Obj]:
    """Everything the pool should own, in apply order (certificates and policy first, so the pods'
    volumes exist soon; backend next; cache nodes last)."""
    return [*certificate_objects(pool, spec), *policy_objects(pool, spec), *etcd_objects(pool, spec),
            *metadata_objects(pool, spec), *cache_objects(pool, spec)]

