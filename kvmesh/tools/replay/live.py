"""The live replay: the same requests sent through real processes (router -> engine simulators).

Each request is released at its trace time divided by `speedup`: Route at the router,
Generate at the engine it names (which fetches from and offloads to the real cache nodes),
then Release. The engines run simulated time `speedup` times faster too, so the timing
model sees the trace's real arrival rate while the replay takes 1/speedup of its duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Sequence

import grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.replay.metrics import ReplayResult, RequestRecord
from kvmesh.tools.workload.trace import TraceRequest, infinite_cache_bound, infinite_cache_hits
from kvmesh.v1 import enginesim_pb2, enginesim_pb2_grpc, router_pb2, router_pb2_grpc

ProgressFn = Callable[[int], None]


async def replay_live(
    requests: Sequence[TraceRequest],
    router_address: str,
    speedup: float,
    label: str = "",
    engine_ids: Sequence[str] = (),
    max_inflight: int = 512,
    timeout_s: float = 600.0,
    progress: ProgressFn | None = None,
    stop: threading.Event | None = None,
    settings: dict[str, object] | None = None,
) -> ReplayResult:
    """Replays `requests` against a running mesh; returns the records of the finished ones."""
    started = time.perf_counter()
    result = ReplayResult(label or "live", "live", list(engine_ids), bound=infinite_cache_bound(requests),
                          settings=dict(settings or {}, speedup=speedup))
    inflight: dict[str, int] = dict.fromkeys(engine_ids, 0)
    engines: dict[str, enginesim_pb2_grpc.EngineSimStub] = {}
    channels: list[grpc.aio.Channel] = []
    gate = asyncio.Semaphore(max_inflight)
    errors: list[str] = []
    router_channel = open_channel(router_address)
    router = router_pb2_grpc.RouterStub(router_channel)

    def engine_stub(address: str) -> enginesim_pb2_grpc.EngineSimStub:
        stub = engines.get(address)
        if stub is None:
            channel = open_channel(address)
            channels.append(channel)
            stub = engines[address] = enginesim_pb2_grpc.EngineSimStub(channel)
        return stub

    async def one(i: int, req: TraceRequest) -> None:
        rid = f"r{i}"
        blocks = router_pb2.BlockIds(ids=list(req.hash_ids))
        try:
            decision = await router.Route(router_pb2.RouteRequest(request_id=rid, blocks=blocks), timeout=timeout_s)
            member = decision.member_id
            counts = inflight.values()
            result.inflight_spread.append((max(counts) - min(counts)) if counts else 0)
            inflight[member] = inflight.get(member, 0) + 1
            if label == "" and decision.policy:
                result.policy = decision.policy
            try:
                resp = await engine_stub(decision.address).Generate(
                    enginesim_pb2.GenerateRequest(request_id=rid, blocks=blocks, output_tokens=req.output_length,
                                                  input_tokens=req.input_length),
                    timeout=timeout_s,
                )
            finally:
                inflight[member] -= 1
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await router.Release(router_pb2.ReleaseRequest(request_id=rid), timeout=10.0)
            result.records.append(RequestRecord(
                request_id=rid, engine=resp.member_id, arrival_ms=req.timestamp_ms, input_tokens=req.input_length,
                output_tokens=req.output_length, prompt_blocks=resp.prompt_blocks,
                local_hit_blocks=resp.local_hit_blocks, pool_hit_blocks=resp.pool_hit_blocks,
                queue_ms=resp.queue_ms, ttft_ms=resp.ttft_ms, e2e_ms=resp.e2e_ms,
            ))
        except grpc.aio.AioRpcError as exc:
            errors.append(f"{rid}: {exc.code().name} {exc.details()}")
        finally:
            gate.release()
            if progress is not None:
                progress(1)

    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    t0 = loop.time()
    first = requests[0].timestamp_ms if requests else 0.0
    try:
        for i, req in enumerate(requests):
            if stop is not None and stop.is_set():
                break
            delay = t0 + (req.timestamp_ms - first) / 1000.0 / speedup - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            tasks.append(asyncio.create_task(one(i, req), name=f"replay-{i}"))
        while tasks and not all(t.done() for t in tasks):
            if stop is not None and stop.is_set():
                break
            await asyncio.wait(tasks, timeout=0.2)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            await channel.close()
        await router_channel.close()
    if not result.engines:
        result.engines = sorted({r.engine for r in result.records})
    ideal = infinite_cache_hits(requests)
    for rec in result.records:
        rec.ideal_hit_blocks = ideal[int(rec.request_id[1:])]
    result.records.sort(key=lambda r: r.arrival_ms)
    result.settings["errors"] = len(errors)
    result.settings["error_samples"] = errors[:5]
    result.wall_s = time.perf_counter() - started
    return result
