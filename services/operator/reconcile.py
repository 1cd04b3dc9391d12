"""Reconcile as a pure function: (pool, what exists) → what to apply, what to delete, and the status.

The kopf handlers (handlers.py) only fetch, call these, and send the result to the API
server, so every decision is unit-tested without a cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvmesh.services.operator.resources import POOL_LABEL, Obj, desired_objects, names, selector_labels
from kvmesh.services.operator.spec import PoolSpec, SpecError, parse_spec

# What the operator may own, as (apiVersion, kind): the RBAC role grants exactly these.
OWNED_KINDS: tuple[tuple[str, str], ...] = (
    ("apps/v1", "StatefulSet"),
    ("apps/v1", "Deployment"),
    ("v1", "Service"),
    ("policy/v1", "PodDisruptionBudget"),
    ("v1", "ConfigMap"),  # the pool's policy
    ("cert-manager.io/v1", "Certificate"),  # the pool's workload certificates (cert-manager writes their Secrets)
)

Key = tuple[str, str, str]  # (apiVersion, kind, name)


def key(obj: Obj) -> Key:
    return obj["apiVersion"], obj["kind"], obj["metadata"]["name"]


def is_subset(want: Any, have: Any) -> bool:
    """True when every field of `want` is in `have` with the same value (the server adds defaults)."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and is_subset(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(is_subset, want, have))
    return bool(want == have) or (str(want) == str(have) and not isinstance(want, bool))


def owned_by(obj: Obj, pool: Obj) -> bool:
    uid = pool["metadata"].get("uid")
    return any(ref.get("uid") == uid and ref.get("controller") for ref in obj["metadata"].get("ownerReferences", []))


@dataclass
class Plan:
    """What one reconcile does. `apply` is server-side applied in order; `delete` are owned leftovers."""

    spec: PoolSpec | None
    create: list[Obj] = field(default_factory=list)
    update: list[Obj] = field(default_factory=list)
    unchanged: list[Obj] = field(default_factory=list)
    delete: list[Obj] = field(default_factory=list)
    error: str | None = None
    error_reason: str = "InvalidSpec"

    @property
    def apply(self) -> list[Obj]:
        return self.create + self.update

    @property
    def changed(self) -> bool:
        return bool(self.create or self.update or self.delete)


def plan(pool: Obj, existing: list[Obj]) -> Plan:
    """Compares the desired objects with the pool's existing ones.

    An invalid spec plans nothing (error set): a typo never deletes a running pool. Objects
    that carry the pool's label but are not controlled by this pool (same name, other uid)
    are never touched.
    """
    try:
        spec = parse_spec(pool.get("spec"))
    except SpecError as exc:
        return Plan(spec=None, error=str(exc), error_reason="InvalidSpec")
    desired = desired_objects(pool, spec)
    have = {key(o): o for o in existing}
    result = Plan(spec=spec)
    for obj in desired:
        current = have.get(key(obj))
        if current is None:
            result.create.append(obj)
        elif not owned_by(current, pool):
            result.error = f"{obj['kind']} {obj['metadata']['name']} exists and is not owned by this pool"
        elif is_subset(obj, current):
            result.unchanged.append(obj)
        else:
            result.update.append(obj)
    if result.error:
        return Plan(spec=spec, error=result.error, error_reason="OwnershipConflict")
    wanted = {key(o) for o in desired}
    result.delete = [o for o in existing if key(o) not in wanted and owned_by(o, pool)]
    return result


def pool_selector(pool: Obj) -> str:
    """The label selector of the pool's cache-node pods (the scale subresource reports it)."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(pool["metadata"]["name"], "cachenode").items())


def owned_label_selector(pool: Obj) -> str:
    return f"{POOL_LABEL}={pool['metadata']['name']}"


def _condition(type_: str, ok: bool, reason: str, message: str, generation: int,
               previous: list[Obj], now: str) -> Obj:
    status = "True" if ok else "False"
    old = next((c for c in previous if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == status and old.get("lastTransitionTime") else now
    return {"type": type_, "status": status, "reason": reason, "message": message,
            "lastTransitionTime": since, "observedGeneration": generation}


def _ready_count(obj: Obj | None) -> int:
    return int(((obj or {}).get("status") or {}).get("readyReplicas") or 0)


def _rolled_out(obj: Obj | None) -> bool:
    """The controller has seen the latest spec and every replica runs it."""
    if obj is None:
        return False
    status, spec = obj.get("status") or {}, obj.get("spec") or {}
    desired = int(spec.get("replicas", 1))
    if int(status.get("observedGeneration") or 0) < int(obj["metadata"].get("generation") or 0):
        return False
    if obj["kind"] == "StatefulSet" and status.get("updateRevision") != status.get("currentRevision"):
        return int(status.get("updatedReplicas") or 0) >= desired
    return int(status.get("updatedReplicas") or 0) >= desired


def _desired_replicas(pool: Obj) -> int:
    """spec.replicas as given (the CRD defaults it to 3); 0 when the spec is unusable."""
    spec = pool.get("spec")
    value = spec.get("replicas", 3) if isinstance(spec, dict) else 0
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def compute_status(pool: Obj, observed: list[Obj], now: str, error: str | None = None,
                   error_reason: str = "InvalidSpec") -> Obj:
    """The pool's status from its observed children.

    Phases: Failed (spec rejected; nothing changed), Pending (no cache node observed yet),
    Progressing (rolling out or scaling), Degraded (rolled out, yet replicas not ready),
    Ready (every cache node ready and the metadata service (and managed etcd) available).
    """
    meta = pool["metadata"]
    generation = int(meta.get("generation") or 0)
    previous = list((pool.get("status") or {}).get("conditions") or [])
    want = _desired_replicas(pool)
    base = {"observedGeneration": generation, "selector": pool_selector(pool), "replicas": want}
    if error is not None:
        cond = _condition("Ready", False, error_reason, error, generation, previous, now)
        return {**base, "phase": "Failed", "readyReplicas": 0, "conditions": [cond]}
    n = names(meta["name"])
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in observed}
    cache = by_name.get(("StatefulSet", n["cache"]))
    metadata = by_name.get(("Deployment", n["metadata"]))
    managed = "managed" in ((pool.get("spec") or {}).get("metadata") or {"managed": {}})
    etcd = by_name.get(("StatefulSet", n["etcd"])) if managed else None
    ready = _ready_count(cache)
    metadata_ok = _ready_count(metadata) >= 1 and (not managed or _ready_count(etcd) >= 1)
    if managed and _ready_count(etcd) < 1:
        md_reason, md_message = "EtcdUnavailable", "the managed etcd has no ready member"
    elif _ready_count(metadata) < 1:
        md_reason, md_message = "MetadataUnavailable", "no metadata replica is ready"
    else:
        md_reason, md_message = "Available", f"{_ready_count(metadata)} metadata replica(s) ready"
    rolled = _rolled_out(cache) and (metadata is None or _rolled_out(metadata))
    if cache is None:
        phase, reason = "Pending", "Creating"
    elif ready >= want and metadata_ok and rolled:
        phase, reason = "Ready", "AllReplicasReady"
    elif not rolled:
        phase, reason = "Progressing", "RollingOut"
    else:
        phase, reason = "Degraded", "ReplicasNotReady" if ready < want else md_reason
    conditions = [
        _condition("Ready", phase == "Ready", reason, f"{ready}/{want} cache nodes ready", generation, previous, now),
        _condition("MetadataAvailable", metadata_ok, md_reason, md_message, generation, previous, now),
        _condition("Progressing", phase in ("Pending", "Progressing"), reason,
                   "rolling out" if phase in ("Pending", "Progressing") else "rolled out", generation, previous, now),
    ]
    return {**base, "phase": phase, "readyReplicas": ready, "conditions": conditions}
