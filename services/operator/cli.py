"""`kvmesh operator`: runs the KVCachePool operator (kopf) against the current cluster.

Settings are flags or KVMESH_* environment variables like every kvmesh command. Inside a
pod it uses the in-cluster service account; elsewhere the kubeconfig.
"""

from __future__ import annotations

import argparse

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.services.operator.settings import OperatorSettings


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
