"""Settings of `kvmesh operator` (flags and `KVMESH_*` environment variables)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class OperatorSettings(BaseSettings):
    """The operator serves no gRPC, so it takes only these (not ServiceSettings)."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_", frozen=True, extra="ignore")

    namespaces: str = Field("", description="comma-separated namespaces to watch (default: the whole cluster)")
    liveness_endpoint: str | None = Field(
        None, description="serve a liveness probe, e.g. http://0.0.0.0:8080/healthz"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="log level")
    log_format: Literal["text", "json"] = Field("text", description="log format: text or json")

    @property
    def namespace_list(self) -> list[str]:
        return [n.strip() for n in self.namespaces.split(",") if n.strip()]
