"""`kvmesh enginesim`: run an engine simulator."""

from __future__ import annotations

import argparse

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.runtime.server import run_service
from kvmesh.services.enginesim.settings import EngineSimSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, EngineSimSettings)


def run(args: argparse.Namespace) -> int:
    from kvmesh.services.enginesim.service import EngineSimService

    settings = settings_from_args(EngineSimSettings, args)
    return run_service(EngineSimService(settings), settings)
