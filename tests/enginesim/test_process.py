"""`kvmesh enginesim` as a real process: registration and load, Generate, KV events to the router."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import (
    common_pb2,
    enginesim_pb2,
    enginesim_pb2_grpc,
    metadata_pb2,
    metadata_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def _mesh(discover_router: bool = False) -> AsyncIterator[tuple[str, str, str]]:
    """Metadata, a router and one simulated engine (sim-0) as processes: their addresses."""
    async with process_mesh(metadata_backend="memory://", routers=1, router_settings={"block_size": 512}) as mesh:
        # Without --router the engine finds routers in the membership (they register as ROLE_ROUTER).
        to_router: dict[str, Any] = {} if discover_router else {"router": mesh.router_address}
        engine = await mesh.add("engine", "sim-0", **to_router, pool=False, speedup=50, capacity_blocks=64)
        yield mesh.metadata_address, mesh.router_address, engine.address


def _gen(rid: str, blocks: list[int], out: int = 20, tokens: int = 0) -> enginesim_pb2.GenerateRequest:
    return enginesim_pb2.GenerateRequest(request_id=rid, blocks=router_pb2.BlockIds(ids=blocks),
                                         output_tokens=out, input_tokens=tokens)


async def test_generate_hits_its_own_cache_and_reports_to_router_and_metadata() -> None:
    async with _mesh() as (md, router, engine), open_channel(engine) as ch, open_channel(router) as rch, \
            open_channel(md) as mch:
        sim = enginesim_pb2_grpc.EngineSimStub(ch)
        started = time.monotonic()
        first = await sim.Generate(_gen("a", [11, 12, 13, 14], out=100), timeout=30)
        wall = time.monotonic() - started
        assert first.member_id == "sim-0" and first.prompt_blocks == 4
        assert first.local_hit_blocks == 0 and first.computed_blocks == 4
        assert 150 < first.ttft_ms < 600  # 2048 prompt tokens of an 8B model on an A100
        assert first.e2e_ms > first.ttft_ms + 99 * 10  # 99 decode steps of at least ~10 ms
        assert wall < first.e2e_ms / 1000.0  # --speedup 50 compressed it
        second = await sim.Generate(_gen("b", [11, 12, 13, 14, 15, 16]), timeout=30)
        assert second.local_hit_blocks == 4 and second.computed_blocks == 2
        assert second.ttft_ms < first.ttft_ms

        # The router learnt the engine's blocks precisely from its KV events.
        rstub = router_pb2_grpc.RouterStub(rch)

        async def learnt() -> bool:
            stats = await rstub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
            assert stats.tree_nodes >= 6 and stats.events_applied >= 2, stats
            return True

        await eventually(learnt, timeout=10, interval=0.1, what="the router to apply the engine's events")
        decision = await rstub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=[11, 12, 13, 99])))
        assert decision.member_id == "sim-0" and decision.matched_blocks == 3

        # It registered as an engine and reports its KV usage through KeepAlive.
        mstub = metadata_pb2_grpc.MembershipStub(mch)

        async def reported() -> dict[str, common_pb2.Member]:
            listed = await mstub.List(metadata_pb2.ListRequest(role=common_pb2.ROLE_ENGINE), timeout=5)
            engines = {m.id: m for m in listed.members}
            assert "sim-0" in engines and engines["sim-0"].load.kv_usage > 0, engines
            return engines

        engines = await eventually(reported, timeout=10, interval=0.1, what="the engine's KV usage")
        assert engines["sim-0"].address == engine
        assert engines["sim-0"].load.kv_usage == pytest.approx(6 / 64)


async def test_bad_requests_get_invalid_argument_and_the_engine_keeps_serving() -> None:
    async with _mesh(discover_router=True) as (_, router, engine), open_channel(engine) as ch, \
            open_channel(router) as rch:
        sim = enginesim_pb2_grpc.EngineSimStub(ch)
        bad = [
            enginesim_pb2.GenerateRequest(request_id="x"),  # no prompt
            _gen("y", []),  # empty prompt
            _gen("z", [1, 2], tokens=5000),  # more tokens than 2 blocks hold
            _gen("w", [1], out=10_000_000),  # absurd output length
        ]
        for req in bad:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await sim.Generate(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok = await sim.Generate(
            enginesim_pb2.GenerateRequest(request_id="t", tokens=router_pb2.TokenIds(ids=list(range(1200)))),
            timeout=30,
        )
        assert ok.prompt_blocks == 2  # 1200 tokens = two full 512-token blocks
        # The engine cut the tokens into the same block ids as the router: its events match.
        rstub = router_pb2_grpc.RouterStub(rch)
        tokens = router_pb2.TokenIds(ids=list(range(1100)))

        async def matched() -> bool:
            decision = await rstub.Route(router_pb2.RouteRequest(model="llama-3-8b", tokens=tokens), timeout=5)
            assert decision.matched_blocks == 2, decision
            return True

        await eventually(matched, timeout=10, interval=0.1, what="the router to match the engine's blocks")


async def test_engines_share_blocks_through_the_cache_pool() -> None:
    async with process_mesh(metadata_backend="memory://", cachenodes=1, routers=1,
                            cachenode_settings={"storage": "memory://?capacity=8MiB"}) as mesh:
        common: dict[str, Any] = {"router": mesh.router_address, "pool": True, "speedup": 50, "block_bytes": "8KiB"}
        a = (await mesh.add("engine", "sim-a", **common)).address
        b = (await mesh.add("engine", "sim-b", **common)).address
        await _share_blocks(mesh.metadata_address, a, b)


async def _share_blocks(md: str, a: str, b: str) -> None:
    from kvmesh.blocks import BlockHasher
    from kvmesh.client import CacheClient

    client = await CacheClient.connect([md], namespace="kvmesh")
    try:
        # A value that is not what the engine wrote for this block must never count as a hit.
        key = BlockHasher(namespace="kvmesh", model="llama-3-8b", block_size=512).id_keys([777])[0]
        assert await client.put_many([(key, b"x" * 8192)]) == 1
        async with open_channel(a) as cha, open_channel(b) as chb:
            sim_a = enginesim_pb2_grpc.EngineSimStub(cha)
            sim_b = enginesim_pb2_grpc.EngineSimStub(chb)
            first = await sim_a.Generate(_gen("a1", [1, 2, 3, 4, 5]), timeout=30)
            assert first.pool_hit_blocks == 0 and first.computed_blocks == 5
            keys = BlockHasher(namespace="kvmesh", model="llama-3-8b", block_size=512).id_keys([1, 2, 3, 4, 5])

            async def offloaded() -> bool:  # after the prefill
                return await client.exists_prefix(keys) == 5

            await eventually(offloaded, timeout=10, interval=0.05, what="the blocks to reach the pool")
            values = await client.get_many(keys)
            assert all(v is not None and len(v) == 8192 for v in values)  # --block-bytes of real data
            second = await sim_b.Generate(_gen("b1", [1, 2, 3, 4, 5, 6]), timeout=30)
            assert second.local_hit_blocks == 0 and second.pool_hit_blocks == 5 and second.computed_blocks == 1
            assert second.ttft_ms < first.ttft_ms / 2  # copying 5 blocks beats recomputing them
            corrupt = await sim_b.Generate(_gen("b2", [777, 778]), timeout=30)
            assert corrupt.pool_hit_blocks == 0 and corrupt.computed_blocks == 2
    finally:
        await client.close()


async def test_a_restarted_router_relearns_the_engine_cache() -> None:
    # A pinned router port: the restarted router comes back where the engine sends its events.
    router_settings = {"listen": f"127.0.0.1:{free_port()}", "block_size": 512}
    async with process_mesh(metadata_backend="memory://", routers=1, router_settings=router_settings) as mesh:
        router_addr = mesh.router_address
        engine = await mesh.add("engine", "sim-r", router=router_addr, pool=False, speedup=50)
        await _relearn(mesh, router_addr, engine.address)


async def _relearn(mesh: MeshHandle, router_addr: str, engine: str) -> None:
    async with open_channel(engine) as ch:
        sim = enginesim_pb2_grpc.EngineSimStub(ch)
        await sim.Generate(_gen("a", [21, 22, 23]), timeout=30)
    await mesh.kill("router-0")  # its tree is gone with it
    await mesh.restart("router-0")
    async with open_channel(router_addr) as rch:
        rstub = router_pb2_grpc.RouterStub(rch)

        async def relearnt() -> bool:  # no Route before the events: a route would teach the router approximately
            stats = await rstub.Stats(router_pb2.RouterStatsRequest(), timeout=5)
            assert stats.members == 1 and stats.events_applied >= 2 and stats.tree_nodes >= 3, stats
            return True

        await eventually(relearnt, timeout=20, interval=0.2, what="the new router to learn the engine's blocks",
                         retry_on=(AssertionError, grpc.aio.AioRpcError))
        decision = await rstub.Route(router_pb2.RouteRequest(blocks=router_pb2.BlockIds(ids=[21, 22, 23, 24])))
        assert decision.member_id == "sim-r" and decision.matched_blocks == 3


async def test_a_request_over_its_deadline_gets_deadline_exceeded() -> None:
    async with process_mesh(metadata_backend="memory://", engines=1,
                            engine_settings={"pool": False, "request_timeout_seconds": 0.5}) as mesh, \
            open_channel(mesh.addresses("engine")[0]) as ch:
        sim = enginesim_pb2_grpc.EngineSimStub(ch)
        with pytest.raises(grpc.aio.AioRpcError) as err:  # ~10 s of simulated decode at speedup 1
            await sim.Generate(_gen("slow", [1], out=1000), timeout=10)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        quick = await sim.Generate(_gen("quick", [2], out=1), timeout=10)
        assert quick.computed_blocks == 1
