"""`kvmesh cachenode`: run a cache node."""

from __future__ import annotations

import argparse

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.runtime.server import run_service
from kvmesh.services.cachenode.settings import CacheNodeSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, CacheNodeSettings)


def run(args: argparse.Namespace) -> int:
    from kvmesh.services.cachenode.service import CacheNodeService

    settings = settings_from_args(CacheNodeSettings, args)
    return run_service(CacheNodeService(settings), settings)
