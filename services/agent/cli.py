"""`kvmesh agent --engine-url http://HOST:PORT --metadata HOST:PORT ...`."""

from __future__ import annotations

import argparse

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.runtime.server import run_service
from kvmesh.services.agent.settings import AgentSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_settings_arguments(parser, AgentSettings)


def run(args: argparse.Namespace) -> int:
    settings = settings_from_args(AgentSettings, args)
    from kvmesh.services.agent.service import AgentService

    return run_service(AgentService(settings), settings)
