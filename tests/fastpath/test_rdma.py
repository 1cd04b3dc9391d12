"""rdma:// over Mooncake's TCP transport, in a private network namespace (`unshare -n`).

The node and the client are real processes inside the namespace: the cases live in
netns_rdma_cases.py and run under their own pytest there; this test asserts they all pass.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys

import pytest

from kvmesh.services.cachenode.storage.rdma import RdmaStorage
from kvmesh.tools.processes import kvmesh_env
from kvmesh.uri import UriError, parse_uri


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not _unshare_works(), reason="this machine forbids private network namespaces (unshare -n)")
async def test_rdma_cases_pass_inside_a_private_network_namespace() -> None:
    cases = os.path.join("tests", "fastpath", "netns_rdma_cases.py")
    inner = f"{sys.executable} -m pytest -q -p no:cacheprovider {cases}"
    env = kvmesh_env({"MC_TCP_BIND_ADDRESS": "127.0.0.1"})
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", "sh", "-c", f"ip link set lo up && exec {inner}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 110)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-6000:]
    assert "9 passed" in text and "failed" not in text and "skipped" not in text, text[-3000:]


@pytest.mark.parametrize(
    "uri",
    ["rdma://?capacity=1MiB", "rdma://127.0.0.1?protocol=carrier-pigeon", "rdma://127.0.0.1?capacity=0"],
)
async def test_bad_rdma_uris_are_refused(uri: str) -> None:
    with pytest.raises(UriError):
        await RdmaStorage.create(parse_uri(uri))
