"""Virtualenvs of the real third-party software the integration tests run.

Each product (vLLM on CPU, Envoy, LMCache, aibrix-kvcache, sglang-router) pins versions the others
conflict with, so each has its own virtualenv, built by `scripts/integration_env.sh` under
`$KVMESH_VENVS` (default `.venvs/` in the checkout, ignored by git) and reused between runs. kvmesh
is not installed in them: a process that loads kvmesh code gets the checkout on PYTHONPATH.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import kvmesh

BUILD_TIMEOUT_S = 1200.0


def checkout_root() -> Path:
    """The source checkout kvmesh is imported from (integration tests run from a checkout)."""
    root = Path(kvmesh.__file__).resolve().parent.parent
    if not (root / "scripts" / "integration_env.sh").exists():
        raise RuntimeError(f"integration tests need a kvmesh source checkout; kvmesh is imported from {root}")
    return root


def venvs_root() -> Path:
    """Where the integration virtualenvs live: `$KVMESH_VENVS`, else `.venvs/` in the checkout."""
    configured = os.environ.get("KVMESH_VENVS")
    return Path(configured) if configured else checkout_root() / ".venvs"


def integration_python(name: str, timeout: float = BUILD_TIMEOUT_S) -> Path:
    """The Python of integration virtualenv `name`, built first if missing or out of date."""
    root = checkout_root()
    subprocess.run(
        [str(root / "scripts" / "integration_env.sh"), name],
        check=True, timeout=timeout, env=dict(os.environ, KVMESH_VENVS=str(venvs_root())),
    )
    return venvs_root() / name / "bin" / "python"


def integration_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a third-party process that loads kvmesh code: the checkout on PYTHONPATH,
    no inherited KVMESH_* flags (they are meant for the parent)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_") and k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(checkout_root())
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


async def run_product(python: Path, *args: str, cwd: Path, env: dict[str, str], timeout_s: float = 300) -> str:
    """Runs `python args...` (a product's virtualenv, `env` from `integration_env`) to its end and
    returns its stdout and stderr together; asserts it exited 0, showing the output's tail if not.
    The process is killed if the caller is cancelled or the timeout passes."""
    proc = await asyncio.create_subprocess_exec(str(python), *args, cwd=cwd, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout_s)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text
