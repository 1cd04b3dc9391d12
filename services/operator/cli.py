"""`kvmesh operator`: runs the KVCachePool operator (kopf) against the current cluster.

Settings are flags or KVMESH_* environment variables like every kvmesh command. Inside a
pod it uses the in-cluster service account; elsewhere the kubeconfig.
"""

from __future__ import annotations

import argparse
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from kvmesh.flags import add_settings_arguments, settings_from_args


class OperatorSettings(BaseSettings):
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, OperatorSettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(OperatorSettings, args)
    import kopf

    from kvmesh.logs import setup_logging
    from kvmesh.services.operator import controller  # noqa: F401  (registers the handlers with kopf)

    setup_logging(settings.log_level, settings.log_format)
    namespaces = settings.namespace_list
    kopf.run(
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces,
        liveness_endpoint=settings.liveness_endpoint,
    )
    return 0
