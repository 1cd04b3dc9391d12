"""The KVCachePool spec as typed, validated Python, with the same defaults as the CRD schema.

The API server applies the CRD's defaults and rejects what its schema rejects; this model
parses what the operator is handed (and what unit tests build by hand) into one frozen
object, and checks what an OpenAPI schema cannot (storage URIs, quantities).
tests/operator/test_crd_schema.py checks that both sets of defaults agree.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kvmesh.security.policy import Policy
from kvmesh.tiers import STORAGE_SCHEMES, split_tiers
from kvmesh.uri import UriError, parse_uri

GROUP = "kvcache.kvmesh.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "KVCachePool"
PLURAL = "kvcachepools"

DEFAULT_IMAGE = "kvmesh/kvmesh:0.1.0"
DEFAULT_ETCD_IMAGE = "quay.io/coreos/etcd:v3.5.15"
DEFAULT_ENGINE = "memory://?capacity=2GiB"
# The cert-manager issuer a pool's certificates come from unless its spec names another: one CA for
# the cluster (a ClusterIssuer, so pools in any namespace and their clients share it), docs/deploy.md.
DEFAULT_ISSUER = "kvmesh-ca"
DEFAULT_ISSUER_KIND: Literal["Issuer", "ClusterIssuer"] = "ClusterIssuer"
# Kubernetes resource quantities: 500m, 2, 1.5Gi, 10G, 1e3.
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|m|k|u|n)?$")
HOST_PORT = re.compile(r"^[A-Za-z0-9.\-\[\]:]+:\d{1,5}$")
MAX_POOL_NAME = 40  # leaves room for "-metadata-<hash>-<hash>" pod names and StatefulSet revision labels


class SpecError(ValueError):
    """A pool spec the operator cannot act on (reported in status, nothing changed)."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, strict=True)


def _check_quantity(value: str | int) -> str | int:
    if not QUANTITY.match(str(value)):
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    return value


Quantity = Annotated[str | int, AfterValidator(_check_quantity)]


class ServiceSpec(_Model):
    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = "ClusterIP"
    port: int = Field(7500, ge=1, le=65535)


class Resources(_Model):
    requests: dict[str, Quantity] = Field(default_factory=dict)
    limits: dict[str, Quantity] = Field(default_factory=dict)


class StorageSpec(_Model):
    size: Quantity = "10Gi"
    storage_class_name: str | None = Field(None, alias="storageClassName")


class CacheSpec(_Model):
    image: str = Field(DEFAULT_IMAGE, min_length=1)
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field("IfNotPresent", alias="imagePullPolicy")
    engine: str = DEFAULT_ENGINE
    resources: Resources | None = None
    storage: StorageSpec | None = None

    @field_validator("engine")
    @classmethod
    def _engine(cls, value: str) -> str:
        tiers = split_tiers(value)
        if not tiers or any(not part.strip() for part in value.split(",")):
            raise ValueError(f"empty tier in engine {value!r}")
        for tier in tiers:
            try:
                uri = parse_uri(tier)
                scheme = uri.scheme
                uri.size_param("capacity", 0)  # a capacity must be a size (2GiB), checked here not in the pod
            except UriError as exc:
                raise ValueError(f"bad storage URI {tier!r}: {exc}") from None
            if scheme not in STORAGE_SCHEMES:
                raise ValueError(f"unknown storage scheme {scheme!r} (known: {', '.join(sorted(STORAGE_SCHEMES))})")
        return ",".join(tiers)

    @property
    def tiers(self) -> list[str]:
        return split_tiers(self.engine)

    def disk_paths(self) -> list[str]:
        """Mount points the disk tiers need (each gets a volume)."""
        return [parse_uri(t).path or "/data" for t in self.tiers if t.startswith("disk://")]

    def memory_bytes(self) -> int:
        """DRAM the memory tiers may fill (for default resource requests)."""
        return sum(parse_uri(t).size_param("capacity", 0) for t in self.tiers if t.startswith("memory://"))


class SchedulerSpec(_Model):
    gpu_type: str | None = Field(None, alias="gpuType", max_length=63)
    affinity_workload: str | None = Field(None, alias="affinityWorkload", max_length=63)


class ManagedMetadata(_Model):
    replicas: Literal[1, 3] = 1
    image: str = DEFAULT_ETCD_IMAGE
    storage: Quantity = "1Gi"


class EtcdMetadata(_Model):
    endpoints: list[str] = Field(min_length=1)
    prefix: str = "/kvmesh"

    @field_validator("endpoints")
    @classmethod
    def _endpoints(cls, value: list[str]) -> list[str]:
        for e in value:
            if not HOST_PORT.match(e):
                raise ValueError(f"etcd endpoint must be host:port, got {e!r}")
        return value


class SecretKeyRef(_Model):
    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class RedisMetadata(_Model):
    address: str
    db: int = Field(0, ge=0, le=15)
    password_secret_ref: SecretKeyRef | None = Field(None, alias="passwordSecretRef")

    @field_validator("address")
    @classmethod
    def _address(cls, value: str) -> str:
        if not HOST_PORT.match(value):
            raise ValueError(f"redis address must be host:port, got {value!r}")
        return value


class MetadataSpec(_Model):
    """Exactly one of: managed (the operator runs etcd), etcd (bring your own), redis (bring your own)."""

    managed: ManagedMetadata | None = None
    etcd: EtcdMetadata | None = None
    redis: RedisMetadata | None = None
    replicas: int = Field(2, ge=1, le=9)

    @model_validator(mode="after")
    def _exactly_one(self) -> MetadataSpec:
        chosen = [n for n in ("managed", "etcd", "redis") if getattr(self, n) is not None]
        if len(chosen) != 1:
            raise ValueError(f"spec.metadata needs exactly one of managed, etcd, redis (got {chosen or 'none'})")
        return self


class IssuerRef(_Model):
    name: str = Field(DEFAULT_ISSUER, min_length=1)
    kind: Literal["Issuer", "ClusterIssuer"] = DEFAULT_ISSUER_KIND
    group: str = Field("cert-manager.io", min_length=1)


class TLSSpec(_Model):
    """Mutual TLS and a policy for the pool's pods (on unless `enabled: false`, plaintext as before)."""

    enabled: bool = True
    issuer_ref: IssuerRef = Field(default_factory=lambda: IssuerRef.model_validate({}), alias="issuerRef")


class PolicySpec(_Model):
    """Grants for the pool's clients (engines, routers, tools), in the policy file's schema
    (docs/security.md); the operator adds its own workloads' grants."""

    principals: dict[str, Any] = Field(default_factory=dict)

    @field_validator("principals")
    @classmethod
    def _grants(cls, value: dict[str, Any]) -> dict[str, Any]:
        try:
            Policy.model_validate({"principals": value})
        except ValidationError as exc:
            problems = [f"{'.'.join(str(p) for p in err['loc'][1:])}: {err['msg']}" for err in exc.errors()]
            raise ValueError("; ".join(problems)) from None
        return value


class PoolSpec(_Model):
    replicas: int = Field(3, ge=0, le=1000)
    service: ServiceSpec = Field(default_factory=lambda: ServiceSpec.model_validate({}))
    cache: CacheSpec = Field(default_factory=lambda: CacheSpec.model_validate({}))
    scheduler: SchedulerSpec = Field(default_factory=lambda: SchedulerSpec.model_validate({}))
    metadata: MetadataSpec = Field(default_factory=lambda: MetadataSpec.model_validate({"managed": {}}))
    tls: TLSSpec = Field(default_factory=lambda: TLSSpec.model_validate({}))
    policy: PolicySpec | None = None

    @model_validator(mode="after")
    def _policy_needs_tls(self) -> PoolSpec:
        if self.policy is not None and self.policy.principals and not self.tls.enabled:
            raise ValueError("spec.policy needs spec.tls.enabled: without TLS there are no identities to grant to")
        return self


def parse_spec(spec: dict[str, Any] | None) -> PoolSpec:
    """The pool's spec, defaulted and checked; SpecError says what is wrong, field by field."""
    try:
        return PoolSpec.model_validate(spec or {})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"spec.{where}: {err['msg']}" if where else err["msg"])
        raise SpecError("; ".join(problems)) from None
