"""Settings of `kvmesh cachenode` (flags and `KVMESH_*` environment variables)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from kvmesh.settings import MemberSettings
from kvmesh.units import parse_size


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

    @model_validator(mode="before")
    @classmethod
    def _engine_is_storage(cls, data: Any) -> Any:
        """`--engine`/`KVMESH_ENGINE` (the flag's first name) fill `--storage` when it is not given."""
        if isinstance(data, dict) and data.get("engine") and not data.get("storage"):
            return {**data, "storage": data["engine"]}
        return data

    @field_validator("max_value_bytes", "chunk_bytes", "max_write_peer_bytes", "max_write_total_bytes", mode="before")
    @classmethod
    def _sizes(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @property
    def allowed_namespaces(self) -> frozenset[str] | None:
        """None when every namespace is served."""
        names = frozenset(n.strip() for n in self.namespaces.split(",") if n.strip())
        return names or None
