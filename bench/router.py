"""Router benchmark: decision latency, gRPC throughput, memory per tree block.

    .venv/bin/python -m bench.router            # 1,000,000 blocks, 64 pods
    .venv/bin/python -m bench.router --quick    # 100,000 blocks, shorter runs

Workload: 2,048-token prompts (128 blocks of 16 tokens). 64 "system prompts" of 512 tokens;
each conversation is one of them plus 1,536 tokens of its own. The tree is filled by routing
conversations until it holds the target number of blocks; then each measured request either
continues a known conversation (first 1,024-2,048 tokens reused, the rest new) or starts a new
one, half and half, and is released after the decision. Figures are printed next to the
targets of issue 4.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import statistics
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime, Service
from kvmesh.services.router.core import RouterCore, Stored
from kvmesh.services.router.router_api import RouterApi
from kvmesh.services.router.settings import RouterSettings
from kvmesh.v1 import common_pb2, router_pb2, router_pb2_grpc

PROMPT_TOKENS = 2048
SYSTEM_TOKENS = 512
PODS = 64


@dataclass
class Workload:
    rng: random.Random
    systems: list[list[int]]
    conversations: list[list[int]]

    @classmethod
    def make(cls, seed: int = 1) -> Workload:
        rng = random.Random(seed)
        systems = [[rng.randrange(100_000) for _ in range(SYSTEM_TOKENS)] for _ in range(64)]
        return cls(rng, systems, [])

    def new_conversation(self) -> list[int]:
        rng = self.rng
        tokens = [*rng.choice(self.systems), *(rng.randrange(100_000) for _ in range(PROMPT_TOKENS - SYSTEM_TOKENS))]
        self.conversations.append(tokens)
        if len(self.conversations) > 50_000:
            self.conversations.pop(rng.randrange(len(self.conversations)))
        return tokens

    def next_prompt(self) -> list[int]:
        rng = self.rng
        if self.conversations and rng.random() < 0.5:
            base = rng.choice(self.conversations)
            keep = rng.randrange(1024, PROMPT_TOKENS + 1)
            return base[:keep] + [rng.randrange(100_000) for _ in range(PROMPT_TOKENS - keep)]
        return self.new_conversation()


def make_core(max_blocks: int, policy: str = "prefix") -> RouterCore:
    settings = RouterSettings(
        policy=policy, max_tree_blocks=max_blocks, random_seed=1, register_self=False, max_prompt_blocks=100_000
    )
    core = RouterCore(policy, settings)
    for i in range(PODS):
        core.add_member(
            common_pb2.Member(id=f"pod-{i}", role=common_pb2.ROLE_ENGINE, address=f"10.0.0.{i}:8000", model="m")
        )
    return core


def fill(core: RouterCore, work: Workload, blocks: int) -> None:
    """Routes conversations until the tree holds `blocks` blocks (approximate learning)."""
    hasher = core.hasher("m")
    n = 0
    # Until the tree is full: at the bound, eviction keeps it just under `blocks`.
    while len(core.tree) < blocks and not core.tree.evicted:
        ids = hasher.token_block_ids(work.new_conversation())
        core.release(core.route(ids, "m", f"fill-{n}", checked=True).request_id)
        n += 1


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def latency(core: RouterCore, work: Workload, count: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Block-id and token latencies in seconds, one request at a time: wall clock, then CPU time.

    CPU time (thread_time) leaves out the time other processes took the core from us, which on
    a shared machine is most of the wall-clock tail.
    """
    hasher = core.hasher("m")
    prompts = [work.next_prompt() for _ in range(count)]
    id_prompts = [hasher.token_block_ids(p) for p in prompts]
    ids_lat: list[float] = []
    tok_lat: list[float] = []
    ids_cpu: list[float] = []
    tok_cpu: list[float] = []
    clock = time.perf_counter
    cpu = time.thread_time
    for i, ids in enumerate(id_prompts):
        c0 = cpu()
        t0 = clock()
        d = core.route(ids, "m", f"i{i}", checked=True)
        ids_lat.append(clock() - t0)
        ids_cpu.append(cpu() - c0)
        core.release(d.request_id)
    prompts = [work.next_prompt() for _ in range(count)]
    for i, tokens in enumerate(prompts):
        c0 = cpu()
        t0 = clock()
        d = core.route_tokens(tokens, "m", f"t{i}")
        tok_lat.append(clock() - t0)
        tok_cpu.append(cpu() - c0)
        core.release(d.request_id)
    return ids_lat, tok_lat, ids_cpu, tok_cpu


def fill_precise(core: RouterCore, work: Workload, blocks: int) -> None:
    """Fills the tree from `stored` KV events (every block also in the id index)."""
    hasher = core.hasher("m")
    n = 0
    while len(core.tree) < blocks and not core.tree.evicted:
        ids = hasher.token_block_ids(work.new_conversation())
        core.apply_events(f"pod-{n % PODS}", [Stored(0, ids)])
        n += 1


def memory_per_block(blocks: int, precise: bool = False) -> tuple[float, int]:
    """Bytes traced by tracemalloc per tree block for a core filled with `blocks` blocks."""
    work = Workload.make(seed=7)
    gc.collect()
    tracemalloc.start()
    core = make_core(blocks * 2)
    base = tracemalloc.get_traced_memory()[0]
    (fill_precise if precise else fill)(core, work, blocks)
    # The workload's own prompts are not the router's memory.
    work.conversations.clear()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return used / len(core.tree), len(core.tree)


class NoopServicer(router_pb2_grpc.RouterServicer):
    """The floor: a unary Route handler that does nothing."""

    async def Route(
        self, request: router_pb2.RouteRequest, context: grpc.aio.ServicerContext
    ) -> router_pb2.RouteResponse:
        return router_pb2.RouteResponse(request_id=request.request_id)


class BenchService(Service):
    name = "router-bench"
    service_names = ("kvmesh.v1.Router",)

    def __init__(self, servicer: router_pb2_grpc.RouterServicer) -> None:
        self.servicer = servicer

    def register(self, server: grpc.aio.Server) -> None:
        router_pb2_grpc.add_RouterServicer_to_server(self.servicer, server)


async def unary_throughput(address: str, requests: list[router_pb2.RouteRequest], seconds: float, conc: int) -> float:
    channel = open_channel(address)
    stub = router_pb2_grpc.RouterStub(channel)
    await stub.Route(requests[0])  # connect
    done = 0
    end = time.perf_counter() + seconds

    async def worker(k: int) -> None:
        nonlocal done
        i = k
        while time.perf_counter() < end:
            await stub.Route(requests[i % len(requests)])
            done += 1
            i += conc

    start = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(conc)))
    elapsed = time.perf_counter() - start
    await channel.close()
    return done / elapsed


async def stream_throughput(address: str, requests: list[router_pb2.RouteRequest], seconds: float) -> float:
    channel = open_channel(address)
    stub = router_pb2_grpc.RouterStub(channel)
    sent = 0
    stop = asyncio.Event()
    window = asyncio.Semaphore(256)

    async def source() -> AsyncIterator[router_pb2.RouteRequest]:
        nonlocal sent
        while not stop.is_set():
            await window.acquire()
            yield requests[sent % len(requests)]
            sent += 1

    received = 0
    start = time.perf_counter()
    end = start + seconds
    call = stub.RouteStream(source())
    async for _ in call:
        received += 1
        window.release()
        if time.perf_counter() >= end:
            stop.set()
            break
    elapsed = time.perf_counter() - start
    call.cancel()
    await channel.close()
    return received / elapsed


async def grpc_bench(blocks: int, seconds: float, conc: int, rounds: int) -> tuple[float, float, float, float]:
    """Median req/s of the no-op handler and of Route, measured in alternating rounds (the
    machine's background load drifts; alternating keeps the comparison fair), and RouteStream."""
    core = make_core(blocks)
    work = Workload.make(seed=3)
    fill(core, work, blocks)
    hasher = core.hasher("m")
    # 2,000 distinct request ids, reused: a re-routed id counts once, so in-flight load stays
    # bounded as in a deployment where requests are released (without a Release call per Route).
    requests = [
        router_pb2.RouteRequest(
            request_id=f"g{i}", model="m", blocks=router_pb2.BlockIds(ids=hasher.token_block_ids(work.next_prompt()))
        )
        for i in range(2000)
    ]
    settings = RouterSettings(listen="127.0.0.1:0", grace_seconds=0.5)
    noop_rt = ServerRuntime(BenchService(NoopServicer()), settings)  # type: ignore[abstract]
    router_rt = ServerRuntime(BenchService(RouterApi(core)), settings)
    noop_addr = await noop_rt.start()
    router_addr = await router_rt.start()
    noop: list[float] = []
    routed: list[float] = []
    try:
        for _ in range(rounds):
            noop.append(await unary_throughput(noop_addr, requests, seconds, conc))
            routed.append(await unary_throughput(router_addr, requests, seconds, conc))
        stream = await stream_throughput(router_addr, requests, seconds)
    finally:
        await noop_rt.stop()
        await router_rt.stop()
    # Median of each adjacent pair's ratio: robust to the machine's load drifting between rounds.
    ratio = statistics.median(r / n for r, n in zip(routed, noop, strict=True))
    return statistics.median(noop), statistics.median(routed), ratio, stream


def row(name: str, value: str, target: str, ok: bool | None) -> None:
    mark = "" if ok is None else ("  ok" if ok else "  MISSED")
    print(f"  {name:<44} {value:>18}   target {target}{mark}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 blocks and short runs")
    parser.add_argument("--blocks", type=int, default=None, help="blocks in the tree (default 1,000,000)")
    parser.add_argument("--requests", type=int, default=None, help="measured in-process decisions per kind")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per gRPC throughput run")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent unary calls")
    args = parser.parse_args(argv)
    blocks = args.blocks or (100_000 if args.quick else 1_000_000)
    count = args.requests or (2_000 if args.quick else 10_000)
    seconds = args.seconds or (2.0 if args.quick else 3.0)

    print(f"router benchmark: {PODS} pods, {PROMPT_TOKENS}-token prompts (128 blocks), tree of {blocks:,} blocks")
    work = Workload.make()
    core = make_core(blocks)
    t0 = time.perf_counter()
    fill(core, work, blocks)
    print(f"  (filled {len(core.tree):,} blocks in {time.perf_counter() - t0:.1f} s)")
    latency(core, work, min(500, count))  # warm up
    ids_lat, tok_lat, ids_cpu, tok_cpu = latency(core, work, count)
    us = 1e6
    print(f"  (tree: {core.tree.nodes():,} nodes; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print("in-process decision latency (RouterCore.route, prefix policy, incl. learning and eviction):")
    for label, values, target in (
        ("block ids, wall", ids_lat, 50),
        ("block ids, CPU time", ids_cpu, 50),
        ("token ids (hash + route), wall", tok_lat, 250),
        ("token ids (hash + route), CPU time", tok_cpu, 250),
    ):
        p50, p99 = statistics.median(values) * us, percentile(values, 0.99) * us
        row(f"{label}: p50 / p99", f"{p50:.1f} / {p99:.1f} us", f"p99 <= {target} us", p99 <= target)
    row("max wall (block ids / tokens)", f"{max(ids_lat) * us:.0f} / {max(tok_lat) * us:.0f} us", "-", None)
    row("tree blocks after the run", f"{len(core.tree):,}", f"<= {blocks:,}", len(core.tree) <= blocks)
    del core
    gc.collect()

    grpc_blocks = min(blocks, 200_000)
    rounds = 3 if args.quick else 7
    noop, routed, ratio, stream = asyncio.run(grpc_bench(grpc_blocks, seconds, args.concurrency, rounds))
    print(
        f"gRPC throughput (server and clients in one process, {args.concurrency} concurrent unary calls, "
        f"tree of {grpc_blocks:,} blocks, {rounds} alternating rounds of {seconds:g} s):"
    )
    row("no-op unary handler", f"{noop:,.0f} req/s", "-", None)
    row("Route (block ids)", f"{routed:,.0f} req/s", "-", None)
    row("Route / no-op (median of paired rounds)", f"{ratio:.0%}", ">= 80%", ratio >= 0.8)
    row("RouteStream (one stream, 256 in flight)", f"{stream:,.0f} req/s", "-", None)

    mem_blocks = min(blocks, 200_000 if args.quick else 1_000_000)
    per_block, measured = memory_per_block(mem_blocks)
    print(f"memory (tracemalloc, {measured:,} blocks):")
    row("bytes per tree block (learnt from routes)", f"{per_block:.0f} B", "<= 300 B", per_block <= 300)
    per_block, measured = memory_per_block(mem_blocks, precise=True)
    row("bytes per tree block (stored by KV events)", f"{per_block:.0f} B", "<= 300 B", per_block <= 300)
    return 0


Fn = Callable[[], None]

if __name__ == "__main__":
    raise SystemExit(main())
