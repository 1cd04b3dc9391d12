"""`kvmesh metadata`: run the metadata service."""

from __future__ import annotations

import argparse
import sys

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.runtime.server import run_service
from kvmesh.services.metadata.settings import MetadataSettings
from kvmesh.uri import UriError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, MetadataSettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(MetadataSettings, args)
    from kvmesh.services.metadata.service import MetadataService
    from kvmesh.services.metadata.stores.registry import resolve_backend

    try:
        resolve_backend(settings.backend)  # a bad URI is a usage error, reported before serving
    except UriError as exc:
        print(f"kvmesh metadata: invalid --backend: {exc}", file=sys.stderr)
        return 2
    return run_service(MetadataService(settings), settings)
