"""`kvmesh router --metadata ADDR --policy NAME ...`."""

from __future__ import annotations

import argparse

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.runtime.server import run_service
from kvmesh.services.router.settings import RouterSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, RouterSettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(RouterSettings, args)
    from kvmesh.services.router.service import RouterService

    return run_service(RouterService(settings), settings)
