"""Flags of `kvmesh metadata`."""

from __future__ import annotations

from pydantic import Field, field_validator

from kvmesh.settings import DEFAULT_METADATA_ADDRESS, ServiceSettings
from kvmesh.units import parse_size


class MetadataSettings(ServiceSettings):
    listen: str = Field(DEFAULT_METADATA_ADDRESS, description="HOST:PORT to serve gRPC on")
    backend: str = Field(
        "memory://", description="store: memory://, etcd://HOST:PORT?prefix=/kvmesh or redis://HOST:PORT/DB"
    )
    max_ttl_seconds: int = Field(3600, ge=1, le=86400, description="longest lease TTL a member may ask for")
    max_heartbeats_per_second: float = Field(
        2000.0, gt=0, description="heartbeat budget of this replica: intervals stretch beyond ttl/3 to stay under it"
    )
    load_update_interval_ms: int = Field(
        1000, ge=0, le=600_000, description="at most one load UPDATE event per member per this interval"
    )
    max_load_updates_per_second: float = Field(
        200.0, gt=0, description="load UPDATE budget of this replica (per-member interval stretches beyond it)"
    )
    max_key_bytes: int = Field(1024, ge=1, le=65536, description="longest metadata key")
    max_value_bytes: int = Field(1024 * 1024, ge=1, description="largest metadata value (accepts 1MiB)")
    max_id_bytes: int = Field(253, ge=1, le=4096, description="longest member id")
    max_member_bytes: int = Field(
        16 * 1024, ge=256, le=1024**2, description="largest member record (id, address, labels, ...) (accepts 16KiB)"
    )
    max_labels: int = Field(64, ge=0, le=4096, description="most labels on one member")
    max_label_bytes: int = Field(1024, ge=1, le=65536, description="longest label (name and value together)")
    snapshot_page_bytes: int = Field(
        4 * 1024**2, ge=64 * 1024, description="members per List page / Watch SNAPSHOT message, in bytes (accepts 4MiB)"
    )

    @field_validator("max_value_bytes", "max_member_bytes", "snapshot_page_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value
