"""The kvmesh remote storage plugin inside real LMCache 0.5.6: LMCache's own remote-backend check
(`python -m lmcache.v1.basic_check --mode test_remote`) against a real mesh (metadata + two cache
nodes, as processes)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from kvmesh.client.cache import CacheClient
from kvmesh.tools.testing.integrations import integration_env, integration_python, run_product
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

NUM_KEYS = 6


def lmcache_config(path: Path, metadata: str, namespace: str) -> Path:
    path.write_text(f"""\
chunk_size: 256
local_cpu: true
max_local_cpu_size: 1
remote_url: "plugin://kvmesh"
remote_storage_plugins: ["kvmesh"]
remote_serde: "naive"
extra_config:
  remote_storage_plugin.kvmesh.module_path: kvmesh.integrations.lmcache
  remote_storage_plugin.kvmesh.class_name: KvmeshConnector
  kvmesh.metadata: "{metadata}"
  kvmesh.namespace: "{namespace}"
""")
    return path


async def basic_check(python: Path, config: Path, cwd: Path) -> str:
    text = await run_product(python, "-m", "lmcache.v1.basic_check", "--mode", "test_remote",
                             "--num-keys", str(NUM_KEYS), cwd=cwd,
                             env=integration_env({"LMCACHE_CONFIG_FILE": str(config)}))
    return text


async def test_lmcache_basic_check_passes_against_the_mesh(tmp_path: Path) -> None:
    python = await asyncio.to_thread(integration_python, "lmcache")
    mesh: MeshHandle
    async with process_mesh(cachenodes=2, timeout=None) as mesh:
        config = lmcache_config(tmp_path / "lmcache.yaml", mesh.metadata_address, "lmcache-check")
        out = await basic_check(python, config, tmp_path)
        assert "Test Failed" not in out, out[-4000:]
        validations = re.findall(r"Validation: (\d+)/(\d+) passed", out)
        assert len(validations) == 3, out[-4000:]  # exists (absent), put, exists (present)
        assert all(ok == total == str(NUM_KEYS) for ok, total in validations), out[-4000:]
        assert f"Validation (content correct): {NUM_KEYS}/{NUM_KEYS} passed" in out, out[-4000:]
        # The chunks really are in the mesh, in the configured namespace.
        async with await CacheClient.connect(mesh.metadata_address) as client:
            stats = await client.stats()
        stored = sum(e.items for engines in stats.values() for e in engines)
        assert stored >= NUM_KEYS, stats
