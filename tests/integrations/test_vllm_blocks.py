"""The vLLM connector's parts that need no vLLM: block keys, the sealed block value, and the
worker's copies between paged KV tensors and a real mesh (through the background link)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from types import SimpleNamespace

import pytest
import torch

from kvmesh.blocks import BlockHasher
from kvmesh.client.cache import CacheClient
from kvmesh.integrations.link import MeshLink
from kvmesh.integrations.mesh import open_client, parse_nodes
from kvmesh.integrations.vllm.codec import BlockCodec
from kvmesh.integrations.vllm.keys import block_keys, hasher, shard_key
from kvmesh.integrations.vllm.plan import BlockTransfer, StepPlan
from kvmesh.integrations.vllm.scheduler import SchedulerSide
from kvmesh.integrations.vllm.settings import ConnectorSettings
from kvmesh.integrations.vllm.stats import ConnectorStats
from kvmesh.integrations.vllm.worker import WorkerSide, layer_slots
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually

TOKENS = list(range(100, 100 + 4 * 32 + 5))


def test_plain_keys_are_the_shared_block_keys() -> None:
    blocks = hasher("m", "ns", 32)
    keys = block_keys(blocks, TOKENS)
    assert keys == BlockHasher(namespace="ns", model="m", block_size=32).token_keys(TOKENS)
    assert len(keys) == 4


def test_lora_salt_and_shard_change_the_keys() -> None:
    blocks = hasher("m", "ns", 32)
    plain = block_keys(blocks, TOKENS)
    variants = [block_keys(blocks, TOKENS, lora_name="a"), block_keys(blocks, TOKENS, cache_salt="s"),
                block_keys(blocks, TOKENS, lora_name="a", cache_salt="s"), block_keys(hasher("m", "ns", 16), TOKENS)]
    firsts = {plain[0], *(v[0] for v in variants)}
    assert len(firsts) == 5
    assert shard_key(plain[0], 0, 1) == plain[0]
    assert len({shard_key(plain[0], r, 2) for r in range(2)} | {plain[0]}) == 3


def test_codec_refuses_every_unsound_value() -> None:
    codec = BlockCodec(b'[["l0","torch.bfloat16",[2,32,128]]]', 64)
    key, payload = b"k" * 16, bytes(range(64))
    value = codec.seal(key, payload)
    opened = codec.open(key, value)
    assert opened is not None and bytes(opened) == payload
    flipped = bytearray(value)
    flipped[len(codec.header) + 10] ^= 1
    other_layout = BlockCodec(b'[["l0","torch.float16",[2,32,128]]]', 64)
    assert codec.open(key, bytes(flipped)) is None  # corrupted payload
    assert codec.open(b"j" * 16, value) is None  # stored under another key
    assert codec.open(key, value[:-1]) is None  # truncated
    assert codec.open(key, b"garbage") is None
    assert other_layout.open(key, value) is None  # another engine's layout
    with pytest.raises(ValueError):
        codec.seal(key, payload[:-1])


def test_layer_slots_find_the_block_dimension() -> None:
    caches = {"b": torch.zeros(2, 16, 32, 64), "a": torch.zeros(16, 2, 32, 64, dtype=torch.bfloat16)}
    slots, layout = layer_slots(caches, 16)
    assert [(s.name, s.dim, s.offset, s.nbytes) for s in slots] == [("a", 0, 0, 2 * 32 * 64 * 2),
                                                                     ("b", 1, 8192, 2 * 32 * 64 * 4)]
    assert b"bfloat16" in layout
    with pytest.raises(ValueError):
        layer_slots({"x": torch.zeros(3, 3)}, 16)


def test_parse_nodes() -> None:
    assert [(n.id, n.address) for n in parse_nodes("n0=127.0.0.1:1, 127.0.0.1:2")] == [
        ("n0", "127.0.0.1:1"), ("127.0.0.1:2", "127.0.0.1:2")]
    with pytest.raises(ValueError):
        parse_nodes("n0=nohostport")


@pytest.fixture
async def mesh() -> AsyncIterator[MeshHandle]:
    async with process_mesh(cachenodes=2) as handle:
        yield handle


def kv_caches(seed: int | None) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed or 0)
    def make(*shape: int) -> torch.Tensor:
        t = torch.randn(*shape, generator=gen).to(torch.bfloat16)
        return t if seed is not None else torch.zeros_like(t)
    return {"layers.0.attn": make(16, 2, 32, 128), "layers.1.attn": make(2, 16, 32, 128)}


def worker(link: MeshLink, caches: dict[str, torch.Tensor], stats: ConnectorStats) -> WorkerSide:
    side = WorkerSide(ConnectorSettings(load_timeout_s=5.0), link, stats, rank=0, shards=1, num_blocks=16)
    side.register(caches)
    return side


async def test_worker_saves_then_loads_blocks_through_the_mesh(mesh: MeshHandle) -> None:
    keys = block_keys(hasher("m", "t", 32), TOKENS)
    src, dst = kv_caches(seed=1), kv_caches(seed=None)
    saver_link = MeshLink(lambda: open_client(mesh.metadata_address, None, "t"))
    loader_link = MeshLink(lambda: open_client(mesh.metadata_address, None, "t"))
    save_stats, load_stats = ConnectorStats("worker", None, 60), ConnectorStats("worker", None, 60)
    try:
        for link in (saver_link, loader_link):
            link.start()
            assert await asyncio.to_thread(link.wait_connected, 15.0)
        saver, loader = worker(saver_link, src, save_stats), worker(loader_link, dst, load_stats)
        # Blocks 3, 7, 9, 12 of the source hold the prompt's blocks 0-3.
        await asyncio.to_thread(saver.save, StepPlan(saves=[BlockTransfer("r1", keys, [3, 7, 9, 12])]))
        await eventually(lambda: saver_link.pending == 0, timeout=10.0, what="the background save")
        assert save_stats.snapshot()["saved_blocks"] == 4
        # Load blocks 0-3 into paged blocks 1, 2, 5, 6 of an empty cache.
        plan = StepPlan(loads=[BlockTransfer("r2", keys, [1, 2, 5, 6])])
        await asyncio.to_thread(loader.load, plan)
        assert loader.take_load_errors() == set()
        assert load_stats.snapshot()["loaded_blocks"] == 4
        for s, d in ((3, 1), (7, 2), (9, 5), (12, 6)):
            assert torch.equal(dst["layers.0.attn"][d], src["layers.0.attn"][s])
            assert torch.equal(dst["layers.1.attn"][:, d], src["layers.1.attn"][:, s])
        assert not dst["layers.0.attn"][0].any()  # untouched blocks stay as they were

        # A corrupted block 2: blocks 2 and 3 fail (reported, not copied), 0 and 1 load.
        async with await CacheClient.connect(mesh.metadata_address, namespace="t") as client:
            value = await client.get(keys[2])
            assert value is not None
            await client.put(keys[2], value[:-1] + bytes([value[-1] ^ 1]))
            fresh = kv_caches(seed=None)
            loader = worker(loader_link, fresh, load_stats)
            await asyncio.to_thread(loader.load, StepPlan(loads=[BlockTransfer("r3", keys, [1, 2, 5, 6])]))
            assert loader.take_load_errors() == {5, 6}
            assert not fresh["layers.0.attn"][5].any() and not fresh["layers.0.attn"][6].any()
            assert torch.equal(fresh["layers.0.attn"][2], src["layers.0.attn"][7])
            assert load_stats.snapshot()["corrupt_blocks"] == 1
            assert await client.get(keys[2]) is None  # the bad copy was dropped
            # A request whose load failed saves nothing in that step.
            await asyncio.to_thread(loader.save, StepPlan(saves=[BlockTransfer("r3", keys[2:], [5, 6])]))
            assert load_stats.snapshot()["saved_blocks"] == 0
    finally:
        saver_link.close()
        loader_link.close()


async def test_link_without_a_mesh_answers_nothing_at_once() -> None:
    link = MeshLink(lambda: open_client("127.0.0.1:1", None, "t", sync_timeout_s=0.2))
    link.start()
    try:
        side = worker(link, kv_caches(seed=None), ConnectorStats("worker", None, 60))
        await asyncio.to_thread(side.load, StepPlan(loads=[BlockTransfer("r", [b"k" * 16], [4])]))
        assert side.take_load_errors() == {4}
        await asyncio.to_thread(side.save, StepPlan(saves=[BlockTransfer("r", [b"k" * 16], [4])]))
        assert not link.connected
    finally:
        link.close()


def request(req_id: str, tokens: list[int], salt: str | None = None) -> SimpleNamespace:
    """The fields of a vLLM `Request` the scheduler side reads."""
    return SimpleNamespace(request_id=req_id, prompt_token_ids=tokens, mm_features=[], lora_request=None,
                           cache_salt=salt)


def step(new: list[SimpleNamespace] = (), cached: SimpleNamespace | None = None,  # type: ignore[assignment]
         scheduled: dict[str, int] | None = None) -> SimpleNamespace:
    """The fields of a vLLM `SchedulerOutput` the scheduler side reads."""
    cached = cached or SimpleNamespace(req_ids=[], resumed_req_ids=set(), new_block_ids=[], num_computed_tokens=[])
    return SimpleNamespace(scheduled_new_reqs=list(new), scheduled_cached_reqs=cached,
                           num_scheduled_tokens=scheduled or {})


async def test_scheduler_side_plans_loads_and_saves(mesh: MeshHandle) -> None:
    blocks = hasher("m", "s", 32)
    keys = block_keys(blocks, TOKENS)  # 4 full blocks + 5 tokens
    link = MeshLink(lambda: open_client(mesh.metadata_address, None, "s"))
    stats = ConnectorStats("scheduler", None, 60)
    try:
        link.start()
        assert await asyncio.to_thread(link.wait_connected, 15.0)
        async with await CacheClient.connect(mesh.metadata_address, namespace="s") as client:
            await client.put_many([(k, b"v") for k in keys[:3]])  # the mesh holds blocks 0-2
        side = SchedulerSide(ConnectorSettings(), link, blocks, 1, stats)

        # Local hit of 1 block: the mesh adds blocks 1 and 2 (64 tokens); a salted request gets nothing.
        assert await asyncio.to_thread(side.matched_tokens, request("r1", TOKENS), 32) == 64
        assert await asyncio.to_thread(side.matched_tokens, request("r2", TOKENS, salt="x"), 0) == 0
        side.after_alloc(request("r1", TOKENS), 64)
        new = SimpleNamespace(req_id="r1", block_ids=([10, 11, 12, 13, 14],), num_computed_tokens=96)
        plan = side.plan(step([new], scheduled={"r1": len(TOKENS) - 96}))
        assert [(t.keys, t.block_ids) for t in plan.loads] == [(keys[1:3], [11, 12])]
        assert [(t.keys, t.block_ids) for t in plan.saves] == [(keys[3:4], [13])]  # the block the mesh lacks

        # Preempted, then resumed: vLLM looks it up again and hands over all its blocks anew.
        side.after_alloc(request("r1", TOKENS), 96)
        resumed = SimpleNamespace(req_ids=["r1"], resumed_req_ids={"r1"}, new_block_ids=[([4, 5, 6, 7, 8],)],
                                  num_computed_tokens=[96])
        plan = side.plan(step(cached=resumed, scheduled={"r1": len(TOKENS) - 96}))
        assert [(t.keys, t.block_ids) for t in plan.loads] == [(keys[0:3], [4, 5, 6])]
        assert plan.saves == []
        side.finished("r1")
        assert stats.snapshot()["lookups"] == 2
    finally:
        link.close()


async def test_scheduler_side_without_a_mesh_reports_no_hits() -> None:
    link = MeshLink(lambda: open_client("127.0.0.1:1", None, "s", sync_timeout_s=0.2))
    link.start()
    try:
        side = SchedulerSide(ConnectorSettings(), link, hasher("m", "s", 32), 1, ConnectorStats("scheduler", None, 60))
        assert side.matched_tokens(request("r", TOKENS), 0) == 0
    finally:
        link.close()
