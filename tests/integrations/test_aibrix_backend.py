"""The kvmesh L2 backend inside real aibrix-kvcache 0.8.0, driven through AIBrix's own cache
manager (`aibrix_driver.py`, run in the aibrix virtualenv) against a real mesh (metadata + two
cache nodes, as processes): put/exists/get/delete round trips with equal tensors, then a cache
node SIGKILLed: misses and puts that still work, never a crash."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from kvmesh.tools.testing.integrations import integration_env, integration_python, run_product
from kvmesh.tools.testing.mesh import process_mesh

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

DRIVER = Path(__file__).with_name("aibrix_driver.py")
BLOCK_TOKENS, BLOCKS = 16, 16


async def drive(python: Path, mode: str, metadata: str, cwd: Path) -> dict[str, Any]:
    env = integration_env({
        "KVMESH_METADATA": metadata, "KVMESH_TIMEOUT_S": "5",
        "AIBRIX_KV_CACHE_OL_L1_CACHE_ENABLED": "0", "AIBRIX_KV_CACHE_OL_L2_CACHE_BACKEND": "KVMESH",
        "AIBRIX_KV_CACHE_OL_L2_CACHE_INGESTION_MAX_INFLIGHT_TOKENS": "0",  # puts finish before put() returns
    })
    text = await run_product(python, str(DRIVER), mode, cwd=cwd, env=env)
    line = next((ln for ln in text.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, text[-4000:]
    result: dict[str, Any] = json.loads(line[len("RESULT "):])
    return result


async def test_aibrix_cache_manager_over_the_mesh(tmp_path: Path) -> None:
    python = await asyncio.to_thread(integration_python, "aibrix")
    async with process_mesh(cachenodes=2, names={"cachenode": "node{i}"}, timeout=None) as mesh:
        first = await drive(python, "roundtrip", mesh.metadata_address, tmp_path)
        assert first["backend"] == "KVMESH"
        total = BLOCKS * BLOCK_TOKENS
        assert first["put"] == total
        assert first["exists"] == total
        assert first["get_tokens"] == total and first["get_equal"] is True
        assert first["delete_ok"] is True
        assert first["exists_after_delete"] == 12 * BLOCK_TOKENS
        assert first["get_deleted_not_found"] is True
        assert first["put_back"] is True

        await mesh.kill("node0")
        after = await drive(python, "after_kill", mesh.metadata_address, tmp_path)
        assert after["get_ok_or_miss"] is True, after
        assert after["get_equal"] is True, json.dumps(after)  # what comes back is exactly what was put
        assert after["get_tokens"] < total  # node0's blocks are misses now (16 blocks: not all on node1)
        assert after["exists"] == after["get_tokens"]
        assert after["put_after_kill"] == 4 * BLOCK_TOKENS or isinstance(after["put_after_kill"], str)
        assert after["get_after_kill_equal"] is True or after["put_after_kill"] != 4 * BLOCK_TOKENS
