"""Typed settings shared by every service, read from flags and `KVMESH_*` environment variables.

Each service subclasses `ServiceSettings`; `kvmesh.flags` turns the fields into
flags, so a field `max_value_bytes` is both `--max-value-bytes` and `KVMESH_MAX_VALUE_BYTES`.
Settings are frozen and validated once at startup.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from kvmesh.security.settings import SecuritySettings
from kvmesh.units import parse_size

DEFAULT_METADATA_ADDRESS = "127.0.0.1:7400"


def split_addresses(value: str) -> list[str]:
    """'a:1,b:2' → ['a:1', 'b:2']; each must be host:port."""
    out = [v.strip() for v in value.split(",") if v.strip()]
    for addr in out:
        host, sep, port = addr.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"not a host:port address: {addr!r}")
    if not out:
        raise ValueError("no address given")
    return out


class ServiceSettings(SecuritySettings):
    """Flags every service takes (the TLS, token and policy flags come from `SecuritySettings`)."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_", frozen=True, extra="ignore")

    listen: str = Field("127.0.0.1:0", description="HOST:PORT to serve gRPC on (port 0 picks a free port)")
    advertise: str | None = Field(
        None, description="HOST:PORT other members use to reach this one (default: the listen address)"
    )
    member_id: str | None = Field(None, description="member id to register under (default: generated)")
    grace_seconds: float = Field(5.0, gt=0, le=600, description="how long in-flight calls may finish on stop")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=1024, description="largest gRPC message sent or received (accepts 64MiB)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log format: text or json (structured)")
    otlp_endpoint: str | None = Field(None, description="OTLP/gRPC endpoint for traces and metrics")
    metrics_port: int | None = Field(None, ge=0, lt=65536, description="serve Prometheus /metrics on this port")
    metrics_host: str = Field("127.0.0.1", description="address the /metrics endpoint binds")
    bad_request_log_interval_seconds: float = Field(
        10.0, gt=0, le=86400, description="at most one log line per this interval for undecodable requests"
    )

    @field_validator("listen", "advertise")
    @classmethod
    def _check_address(cls, value: str | None) -> str | None:
        if value is None:
            return value
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @field_validator("max_message_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value


class MemberSettings(ServiceSettings):
    """Flags of services that register with the metadata service."""

    metadata: str = Field(
        DEFAULT_METADATA_ADDRESS, description="metadata service HOST:PORT (comma-separated replicas)"
    )
    ttl_seconds: int = Field(10, ge=1, le=3600, description="membership lease TTL")
    zone: str = Field("", description="zone label reported to the mesh")

    @field_validator("metadata")
    @classmethod
    def _check_metadata(cls, value: str) -> str:
        split_addresses(value)
        return value

    @property
    def metadata_addresses(self) -> list[str]:
        return split_addresses(self.metadata)
