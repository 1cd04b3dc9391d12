"""Settings of `kvmesh cachenode` (flags and `KVMESH_*` environment variables)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import Field, field_validator, model_validator

from kvmesh.settings import MemberSettings
from kvmesh.units import parse_size


def _overrides(text: str, parse: Callable[[str], Any]) -> dict[str, Any]:
    """'a=1GiB,b=0' → {'a': parse('1GiB'), 'b': parse('0')}; raises ValueError on a bad entry."""
    out: dict[str, Any] = {}
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        namespace, sep, value = item.rpartition("=")
        if not sep:
            raise ValueError(f"expected NAMESPACE=VALUE, got {item!r}")
        parsed = parse(value.strip())
        if parsed < 0:
            raise ValueError(f"{item!r}: must not be negative")
        out[namespace.strip()] = parsed
    return out


class CacheNodeSettings(MemberSettings):
    """Flags of the cache node on top of the common member flags."""

    storage: str = Field(
        "memory://?capacity=1GiB&policy=lru",
        description="storage URI, or a comma-separated tier list L1,L2[,L3] (memory://, disk://, redis://, ...)",
    )
    engine: str | None = Field(None, description="older name of --storage, still accepted")
    max_value_bytes: int = Field(256 * 1024**2, gt=0, description="largest value accepted (accepts 256MiB)")
    max_key_bytes: int = Field(1024, gt=0, le=65536, description="largest key accepted")
    chunk_bytes: int = Field(
        4 * 1024**2, ge=4096, description="largest data chunk in one BatchGet message (accepts 4MiB)"
    )
    namespaces: str = Field("", description="comma-separated namespaces this node serves (empty: any)")
    standalone: bool = Field(False, description="serve without registering with the metadata service")
    allocation_timeout_ms: int = Field(
        30_000, ge=10, le=3_600_000, description="data path: unsealed allocations are dropped after this"
    )
    max_sessions: int = Field(
        256, ge=1, le=65536, description="data path: most attached clients at once (Attach beyond: RESOURCE_EXHAUSTED)"
    )
    max_views_per_session: int = Field(
        4096, ge=1, le=1_048_576, description="data path: most values one attached client may hold pinned"
    )
    max_pinned_fraction: float = Field(
        0.5, gt=0, le=1, description="data path: share of the storage's capacity all clients together may pin (1: all)"
    )
    local_control_socket: bool = Field(
        True, description="data path: serve co-located clients' Allocate/Seal/Acquire/Release on a Unix socket"
    )
    view_lease_ms: int = Field(
        60_000, ge=10, le=86_400_000, description="data path: a pinned view not released within this is released"
    )

    max_write_peer_bytes: int = Field(
        512 * 1024**2, gt=0, description="bytes one connection's BatchPut streams may hold unstored (accepts 512MiB)"
    )
    max_write_total_bytes: int = Field(
        1024**3, gt=0, description="bytes all BatchPut streams together may hold before storing (accepts 1GiB)"
    )
    max_write_streams_per_peer: int = Field(64, ge=1, description="BatchPut streams open at once on one connection")
    max_write_streams: int = Field(1024, ge=1, description="BatchPut streams open at once on this node")
    write_idle_timeout_seconds: float = Field(
        30.0, gt=0, le=3600, description="a BatchPut stream that sends no chunk for this long is ended"
    )

    data_listen: str = Field(
        "auto",
        description="HOST:PORT of the bulk data plane (docs/dataplane.md); auto: --listen's host, a free port; off",
    )
    data_max_batch_keys: int = Field(4096, ge=1, le=1_000_000, description="data plane: keys in one request frame")
    data_max_frame_bytes: int = Field(
        1024**3, ge=1024, description="data plane: values in one PUT frame (accepts 1GiB)"
    )
    data_max_inflight_bytes: int = Field(
        4 * 1024**3, ge=1024, description="data plane: PUT values being received by all connections at once"
    )
    data_stall_timeout_s: float = Field(
        10.0, gt=0, le=3600, description="data plane: cut a busy connection slower than --data-min-rate-bytes this long"
    )
    data_min_rate_bytes: int = Field(
        64 * 1024, ge=0, description="data plane: bytes per second a connection sending or reading a frame must move"
    )
    data_idle_timeout_s: float = Field(300.0, gt=0, description="data plane: idle connections are closed after this")

    namespace_quota_bytes: int = Field(
        0, ge=0, description="bytes one namespace may keep on this node (accepts 4GiB; 0: no quota)"
    )
    namespace_quotas: str = Field(
        "", description="per-namespace quotas overriding --namespace-quota-bytes: NS=SIZE,... (0: none)"
    )
    namespace_rate_limit: float = Field(
        0.0, ge=0, description="requests per second one namespace may make to this node (0: no limit)"
    )
    namespace_rate_limits: str = Field(
        "", description="per-namespace rates overriding --namespace-rate-limit: NS=RATE,... (0: none)"
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_is_storage(cls, data: Any) -> Any:
        """`--engine`/`KVMESH_ENGINE` (the flag's first name) fill `--storage` when it is not given."""
        if isinstance(data, dict) and data.get("engine") and not data.get("storage"):
            return {**data, "storage": data["engine"]}
        return data

    @field_validator("data_listen")
    @classmethod
    def _check_data_listen(cls, value: str) -> str:
        if value in ("auto", "off"):
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"expected HOST:PORT, auto or off, got {value!r}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _no_data_tls_flags(cls, data: Any) -> Any:
        """The data plane uses the service's --tls-* files since security was wired: say so plainly."""
        if isinstance(data, dict):
            old = sorted(k for k in data if str(k).startswith("data_tls_"))
            if old:
                raise ValueError(f"{', '.join(old)}: the data plane now uses --tls-cert/--tls-key/--tls-ca "
                                 "(see docs/dataplane.md)")
        return data

    @field_validator("namespace_quotas")
    @classmethod
    def _check_quotas(cls, value: str) -> str:
        _overrides(value, parse_size)
        return value

    @field_validator("namespace_rate_limits")
    @classmethod
    def _check_rates(cls, value: str) -> str:
        _overrides(value, float)
        return value

    @property
    def quota_overrides(self) -> dict[str, int]:
        return _overrides(self.namespace_quotas, parse_size)

    @property
    def rate_overrides(self) -> dict[str, float]:
        return _overrides(self.namespace_rate_limits, float)

    @field_validator(
        "max_value_bytes",
        "chunk_bytes",
        "max_write_peer_bytes",
        "max_write_total_bytes",
        "data_max_frame_bytes",
        "data_max_inflight_bytes",
        "data_min_rate_bytes",
        "namespace_quota_bytes",
        mode="before",
    )
    @classmethod
    def _sizes(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @property
    def allowed_namespaces(self) -> frozenset[str] | None:
        """None when every namespace is served."""
        names = frozenset(n.strip() for n in self.namespaces.split(",") if n.strip())
        return names or None
