"""The kvmesh KV connector inside two real vLLM servers (CPU, tiny random model) over a real mesh
(metadata + two cache nodes, as processes): B loads the prompt blocks A computed and answers
exactly as a cache-free run does; a corrupted value is never loaded; a dead cache node turns into
recomputation, never into an error."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from kvmesh.client.cache import CacheClient
from kvmesh.integrations.vllm.codec import DIGEST_BYTES
from kvmesh.integrations.vllm.keys import block_keys, hasher
from kvmesh.integrations.vllm.stats import summary
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.vllm import BLOCK_SIZE, MODEL_NAME, VllmServer, start_vllm

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500),
              pytest.mark.asyncio(loop_scope="module")]

NAMESPACE = "vllm-e2e"
KEYS = hasher(MODEL_NAME, NAMESPACE, BLOCK_SIZE)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh() -> AsyncIterator[MeshHandle]:
    async with process_mesh(cachenodes=2, names={"cachenode": "node{i}"}, timeout=None) as handle:
        yield handle


@pytest.fixture(scope="module")
def engines(mesh: MeshHandle, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, VllmServer]]:
    """Engines A and B, both with the connector, started together (a start takes minutes)."""
    workdir = Path(tmp_path_factory.mktemp("vllm-connector"))
    servers: dict[str, VllmServer] = {}
    try:
        for name in ("A", "B"):
            port = free_port()
            stats = workdir / f"stats-{port}"
            stats.mkdir()
            config = {"kv_connector": "KvmeshConnector", "kv_connector_module_path": "kvmesh.integrations.vllm",
                      "kv_role": "kv_both",
                      "kv_connector_extra_config": {"metadata": mesh.metadata_address, "namespace": NAMESPACE,
                                                    "stats_dir": str(stats), "stats_log_interval_s": 5}}
            # Eager mode: no torch.compile warm-up (minutes on a busy CPU), same numerics on A and B.
            servers[name] = start_vllm(workdir, "--kv-transfer-config", json.dumps(config),
                                       port=port, wait=False, name=f"vllm-{name}")
        for server in servers.values():
            server.wait_healthy(timeout=1200)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def stats(server: VllmServer, role: str = "worker") -> dict[str, float]:
    """The connector's counters in `server` (summed over its processes of that role)."""
    total: dict[str, float] = {}
    folder = server.log_path.parent / f"stats-{server.port}"
    for path in folder.glob(f"kvmesh-vllm-{role}-*.json"):
        for name, value in json.loads(path.read_text()).items():
            total[name] = total.get(name, 0.0) + value
    return total


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def text(answer: dict[str, Any]) -> str:
    return str(answer["choices"][0]["text"])


async def complete(server: VllmServer, prompt: list[int], *, salt: str | None = None) -> str:
    body: dict[str, Any] = {"model": server.model, "prompt": prompt, "max_tokens": 8, "temperature": 0.0}
    if salt is not None:
        body["cache_salt"] = salt  # a fresh salt: no block of it is cached anywhere → computed from scratch
    return text(await asyncio.to_thread(server.post, "/v1/completions", body))


async def reference(server: VllmServer, prompt: list[int]) -> str:
    """The output of a run that uses no cached KV at all (a fresh cache salt)."""
    before = stats(server)
    out = await complete(server, prompt, salt=uuid.uuid4().hex)
    assert delta(stats(server), before, "loaded_blocks") == 0
    return out


async def wait_saved(server: VllmServer, before: dict[str, float], blocks: int) -> None:
    await eventually(lambda: delta(stats(server), before, "saved_blocks") >= blocks, timeout=30.0,
                     what=f"{blocks} blocks saved to the mesh")


def prompt(seed: int, blocks: int, tail: int) -> list[int]:
    return [(seed * 7919 + i * 31) % 1000 for i in range(blocks * BLOCK_SIZE + tail)]


async def test_b_loads_the_prefix_a_computed_and_answers_identically(engines: dict[str, VllmServer]) -> None:
    a, b = engines["A"], engines["B"]
    long = prompt(1, blocks=6, tail=10)
    shared = long[: 5 * BLOCK_SIZE] + prompt(2, blocks=0, tail=25)  # 5 blocks shared, then its own tail
    saved_before = stats(a)
    out_a = await complete(a, long)
    await wait_saved(a, saved_before, 6)

    expected = await reference(a, shared)
    before, hits_before = stats(b), b.metrics().get("vllm:external_prefix_cache_hits_total", 0.0)
    out_b = await complete(b, shared)
    after, hits_after = stats(b), b.metrics().get("vllm:external_prefix_cache_hits_total", 0.0)
    assert out_b == expected
    assert delta(after, before, "loaded_blocks") == 5, after
    assert hits_after - hits_before == 5 * BLOCK_SIZE  # vLLM's own accounting of external hits
    # The whole long prompt from B: all of it loaded (but its last partial block), same answer as A.
    before = stats(b)
    assert await complete(b, long) == out_a
    assert delta(stats(b), before, "loaded_blocks") == 1  # blocks 0-4 are now in B's own prefix cache


async def test_a_corrupted_value_is_never_loaded(engines: dict[str, VllmServer], mesh: MeshHandle) -> None:
    a, b = engines["A"], engines["B"]
    p = prompt(3, blocks=4, tail=7)
    saved_before = stats(a)
    expected = await complete(a, p)
    await wait_saved(a, saved_before, 4)
    key = block_keys(KEYS, p)[2]
    async with await CacheClient.connect(mesh.metadata_address, namespace=NAMESPACE) as client:
        value = await client.get(key)
        assert value is not None
        corrupted = bytearray(value)
        corrupted[len(value) - DIGEST_BYTES - 100] ^= 0x40  # one bit of the KV payload
        assert await client.put(key, bytes(corrupted))
        before = stats(b)
        assert await complete(b, p) == expected
        after = stats(b)
        assert delta(after, before, "corrupt_blocks") == 1, after
        assert delta(after, before, "loaded_blocks") == 2  # the blocks before the corrupted one
        assert delta(after, before, "failed_load_blocks") == 2  # it and the block after it: recomputed
        assert await client.get(key) != bytes(corrupted)  # the connector dropped the bad copy


async def test_a_dead_cache_node_means_recomputation(engines: dict[str, VllmServer], mesh: MeshHandle) -> None:
    a, b = engines["A"], engines["B"]
    p = prompt(4, blocks=4, tail=5)
    saved_before = stats(a)
    expected = await complete(a, p)
    await wait_saved(a, saved_before, 4)
    async with await CacheClient.connect(mesh.metadata_address, namespace=NAMESPACE) as client:
        holder = client.placement(block_keys(KEYS, p)[0])[0]
    await mesh.kill(holder)  # SIGKILL the node holding the prompt's first block
    before = stats(b)
    assert await complete(b, p) == expected
    assert delta(stats(b), before, "loaded_blocks") == 0
    # Both engines keep serving (and saving to the node that is left).
    p2 = prompt(5, blocks=3, tail=3)
    assert await complete(a, p2) == await reference(b, p2)


async def test_transfer_rates(engines: dict[str, VllmServer]) -> None:
    """Informative: the connector's load and save throughput on this machine (CPU, loopback)."""
    for name, server in engines.items():
        print(f"\nkvmesh connector in vLLM {name}: {summary(stats(server))}")
    assert stats(engines["A"])["saved_bytes"] > 0
    assert stats(engines["B"])["loaded_bytes"] > 0
