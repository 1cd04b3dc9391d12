"""Per-pod KV-event mode against a real vLLM that binds its own publisher: the whole scenario runs
in a private network namespace (`unshare -rn`, loopback only), see `kv_per_pod_scenario.py`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.tools.testing.integrations import integration_python

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


def test_router_follows_a_pod_publisher_inside_a_private_network(tmp_path: Path) -> None:
    assert shutil.which("unshare") and shutil.which("ip"), "needs util-linux unshare and iproute2 ip"
    integration_python("vllm")  # built (or found) before entering the namespace
    script = f"ip link set lo up && exec {sys.executable} -m tests.integrations.kv_per_pod_scenario {tmp_path}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(["unshare", "-rn", "bash", "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=840)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, f"no result (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads(lines[-1][len("RESULT "):])
    assert "error" not in result, json.dumps(result, indent=1)
    assert result["before"] == 0
    assert result["after"] == 3, result  # the request's blocks, learnt from the pod's own publisher
    assert result["batches"] >= 1 and result["blocks"] >= 3
