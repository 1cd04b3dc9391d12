"""The KVMESH_* variables each `kvmesh` subcommand reads, taken from its own --help (so never stale)."""

from __future__ import annotations

import functools
import re
import subprocess
import sys

from kvmesh.tools.processes import kvmesh_env


@functools.cache
def setting_envs(command: str) -> frozenset[str]:
    done = subprocess.run([sys.executable, "-m", "kvmesh", command, "--help"], capture_output=True, text=True,
                          env=kvmesh_env({"COLUMNS": "1000"}), timeout=60)
    assert done.returncode == 0, done.stderr
    return frozenset(re.findall(r"env (KVMESH_[A-Z0-9_]+)", done.stdout))
