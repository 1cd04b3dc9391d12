"""Entry point of the `kvmesh` command.

Subcommands are registered by module path and imported only when run, so `kvmesh router`
never imports the cache-node storages and `kvmesh members` starts fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name → (module exposing `add_arguments(parser)` and `run(args) -> int`, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "metadata": ("kvmesh.services.metadata.cli", "run the metadata service (membership and metadata KV)"),
    "cachenode": ("kvmesh.services.cachenode.cli", "run a cache node"),
    "router": ("kvmesh.services.router.cli", "run the prefix-aware router"),
    "enginesim": ("kvmesh.services.enginesim.cli", "run an engine simulator (a stand-in for an inference pod)"),
    "operator": ("kvmesh.services.operator.cli", "run the KVCachePool Kubernetes operator"),
    "up": ("kvmesh.tools.cli.up", "run the whole mesh on this machine as separate processes"),
    "members": ("kvmesh.tools.cli.members", "list (or --watch) the members of a mesh"),
    "route": ("kvmesh.tools.cli.route", "ask a router where a prompt should go"),
    "bench": ("kvmesh.tools.cli.bench", "benchmarks (trace replay)"),
    "certs": ("kvmesh.tools.cli.certs", "a development CA and member certificates (kvmesh up --secure, compose)"),
    "health": ("kvmesh.tools.cli.health", "probe a service's grpc.health.v1 status (exit 0 when serving)"),
}


def _command_name(argv: Sequence[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="kvmesh", description="kvmesh: a distributed KV-cache mesh")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = _command_name(argv)
    for name, (module_path, help_text) in SUBCOMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:
            module = importlib.import_module(module_path)
            module.add_arguments(sp)
            sp.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if args.version:
        from kvmesh import __version__

        print(f"kvmesh {__version__}")
        return 0
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)
