"""Router KV-event cost: ingestion rate, routing delay during an event storm, and routing quality.

    .venv/bin/python -m bench.router_events            # full sizes
    .venv/bin/python -m bench.router_events --quick    # smaller, for a loaded machine

1. Ingestion on one core (interleaved rounds, medians): stored blocks per second
   - through `RouterCore.apply_events` (ids given, the `ReportEvents` path), and
   - through the vLLM path: msgpack decode + own keys from 32-token blocks + tree (`EventIngest`).
   Rates are per CPU second of the benchmark's thread (`time.thread_time`), so time other
   processes take the core does not count against them.
   Target: >= 1,000,000 stored blocks/s.
2. Storm: a real ZMQ PUB in another process (as vLLM is) floods the router's `KvEventSubscriber`
   (central mode) while a probe on the router's event loop routes every millisecond; prints how
   late each probe ran (time a `Route` would have waited behind event processing), and of that
   wait the CPU time the loop's thread itself used (work that held the loop; the rest is the
   thread not running at all: other processes on a shared machine). Target: max <= 5 ms. (A
   publisher thread inside the router's process, as this benchmark first had, holds the GIL
   for up to the 5 ms switch interval at a time: most of the long turns it measured were the
   loop waiting for the GIL, 0.4 ms of CPU in a 48 ms turn.)
3. Routing quality, in-process trace replay (simulated engines, KV events as they happen):
   `prefix` with events vs an oracle that knows every engine's cache exactly and sends each
   request to the longest real prefix (ties: least in flight). Target: prefix >= 90% of it.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import multiprocessing
import multiprocessing.synchronize
import os
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import msgpack
import zmq

from kvmesh.services.router.core import RouterCore, Stored
from kvmesh.services.router.kv_events.subscriber import KvEventSubscriber
from kvmesh.services.router.settings import RouterSettings
from kvmesh.tools.replay.core_router import CoreRouter
from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.workload.trace import load_trace
from kvmesh.v1 import common_pb2

BLOCK = 32  # vLLM's block size on CPU
EVENT_BLOCKS = 16  # blocks per stored event (one prefill's worth)
_TRACE_NAME = Path("shared") / "traces" / "mooncake_conversation_trace.jsonl"
# The checkout's parent holds shared/ (a worktree under wt/ has it one level higher).
TRACE = next((p / _TRACE_NAME for p in Path(__file__).resolve().parents[1:4] if (p / _TRACE_NAME).exists()),
             Path(__file__).resolve().parents[2] / _TRACE_NAME)


def make_core(max_blocks: int) -> RouterCore:
    core = RouterCore("prefix", RouterSettings(block_size=BLOCK, max_tree_blocks=max_blocks, random_seed=1,
                                               register_self=False))
    core.add_member(common_pb2.Member(id="e", role=common_pb2.ROLE_ENGINE, address="e:1", model="m"))
    return core


def vllm_payloads(blocks: int, start_hash: int = 1) -> list[bytes]:
    """vLLM-style batches: one BlockStored of EVENT_BLOCKS blocks per batch, chained in runs of 64."""
    out: list[bytes] = []
    h = start_hash
    token = 0
    parent: int | None = None
    for i in range(blocks // EVENT_BLOCKS):
        if i % 4 == 0:
            parent = None  # a new conversation every 4 events
        hashes = list(range(h, h + EVENT_BLOCKS))
        tokens = [(token + j) % 50_000 for j in range(EVENT_BLOCKS * BLOCK)]
        event = {"type": "BlockStored", "block_hashes": hashes, "token_ids": tokens, "block_size": BLOCK}
        if parent is not None:
            event["parent_block_hash"] = parent
        out.append(msgpack.packb([time.time(), [event], 0]))
        parent = hashes[-1]
        h += EVENT_BLOCKS
        token += EVENT_BLOCKS * BLOCK
    return out


def rate_tree(blocks: int) -> float:
    core = make_core(blocks + 1)
    chains = [list(range(i, i + 64)) for i in range(1, blocks, 64)]
    gc.collect()
    t = time.thread_time()
    for chain in chains:
        core.apply_events("e", [Stored(0, chain)])
    return blocks / (time.thread_time() - t)


def rate_vllm(payloads: list[bytes]) -> float:
    """Stored blocks per CPU second through the router's own consumer: the batches wait in its
    queue (as a storm leaves them), then it decodes, orders, hashes and applies them."""
    total = len(payloads) * EVENT_BLOCKS
    core = make_core(total + 1)
    settings = RouterSettings(block_size=BLOCK, max_tree_blocks=total + 1, register_self=False,
                              kv_events_queue=len(payloads) + 1, kv_events_max_blocks_per_pod=10_000_000)
    sub = KvEventSubscriber(core, settings)

    async def run() -> float:
        await sub.start()
        for seq, payload in enumerate(payloads):
            sub.offer("e", seq, payload)
        gc.collect()
        t = time.thread_time()
        while sub.ingest.counters.stored_blocks < total:  # noqa: ASYNC110 (the consumer signals nothing)
            await asyncio.sleep(0.005)
        took = time.thread_time() - t
        await sub.close()
        return took

    return total / asyncio.run(run())


def ingestion(rounds: int, blocks: int) -> None:
    payloads = vllm_payloads(blocks)
    tree: list[float] = []
    vllm: list[float] = []
    for _ in range(rounds):  # interleaved, so machine noise hits both alike
        tree.append(rate_tree(blocks))
        vllm.append(rate_vllm(payloads))
    t, v = statistics.median(tree), statistics.median(vllm)
    print(f"1. ingestion, {blocks:,} blocks x {rounds} rounds (median, per CPU second of this thread; "
          f"load average {os.getloadavg()[0]:.1f}):")
    print(f"   ReportEvents path (ids given)          {t / 1e6:6.2f} M blocks/s   target >= 1.00  "
          f"{'met' if t >= 1e6 else 'NOT met'}")
    print(f"   vLLM path (decode + hash 32 tokens)    {v / 1e6:6.2f} M blocks/s   target >= 1.00  "
          f"{'met' if v >= 1e6 else 'NOT met'}")


def publish(endpoint: str, blocks: int, ready: multiprocessing.synchronize.Event) -> None:
    """The engine side of the storm, in its own process: every batch as fast as ZMQ takes them."""
    payloads = vllm_payloads(blocks)
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.connect(endpoint)
    time.sleep(0.5)  # the subscription reaches the PUB
    ready.set()
    for seq, p in enumerate(payloads):
        pub.send_multipart([b"kv@e@m", seq.to_bytes(8, "big"), p])
    pub.close(linger=30_000)
    ctx.term()


async def probe_lags(seconds: float) -> list[float]:
    """How late a 1 ms timer fires on a quiet loop: the machine's own noise, for comparison."""
    lags: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        expected = time.perf_counter() + 0.001
        await asyncio.sleep(0.001)
        lags.append(max(0.0, time.perf_counter() - expected))
    return sorted(lags)


def lag_figures(lags: list[float]) -> str:
    p99 = lags[int(len(lags) * 0.99)] if lags else 0.0
    return (f"p50 {statistics.median(lags) * 1e3:.2f} ms, p99 {p99 * 1e3:.2f} ms, "
            f"max {lags[-1] * 1e3:.2f} ms" if lags else "no samples")


async def storm(blocks: int) -> None:
    port = free_port()
    settings = RouterSettings(block_size=BLOCK, max_tree_blocks=blocks * 2, register_self=False,
                              kv_events_listen=f"tcp://127.0.0.1:{port}", kv_events_queue=100_000)
    core = make_core(blocks * 2)
    core.pods.by_id["e"].labels = {}
    sub = KvEventSubscriber(core, settings)
    await sub.start()
    mp = multiprocessing.get_context("spawn")
    ready = mp.Event()
    proc = mp.Process(target=publish, args=(sub.bound_endpoint, blocks, ready), daemon=True)
    proc.start()
    if not await asyncio.to_thread(ready.wait, 60):
        raise RuntimeError("the publisher process did not start")
    batches = blocks // EVENT_BLOCKS
    lags: list[float] = []
    held: list[float] = []  # of each lag, CPU time this thread used (work holding the loop)
    t0 = time.perf_counter()
    prompt = tuple(range(1, 65))
    while sub.ingest.counters.stored_blocks < batches * EVENT_BLOCKS and time.perf_counter() - t0 < 120:
        expected = time.perf_counter() + 0.001
        cpu = time.thread_time()
        await asyncio.sleep(0.001)
        lag = max(0.0, time.perf_counter() - expected)
        lags.append(lag)
        held.append(min(lag, time.thread_time() - cpu))
        core.release(core.route(prompt, "m").request_id)
    took = time.perf_counter() - t0
    await asyncio.to_thread(proc.join, 60)
    await sub.close()
    got = sub.ingest.counters.stored_blocks
    lags.sort()
    held.sort()
    quiet = await probe_lags(min(took, 5.0))
    print(f"2. storm: {got:,} blocks in {batches:,} ZMQ batches in {took:.1f} s, "
          f"{got / took / 1e6:.2f} M blocks/s end to end (dropped {sub.stats.dropped}; load average "
          f"{os.getloadavg()[0]:.1f})")
    print(f"   a route every 1 ms, during the storm waited: {lag_figures(lags)}   target max <= 5 ms  "
          f"{'met' if lags and lags[-1] <= 0.005 else 'NOT met'}")
    print(f"   of that wait, CPU used by the loop's thread:     {lag_figures(held)}   target max <= 5 ms  "
          f"{'met' if held and held[-1] <= 0.005 else 'NOT met'}")
    print(f"   the same probe on a quiet loop (machine noise):  {lag_figures(quiet)}")


class OracleRouter:
    """Knows each engine's cache exactly (the replay's events, applied at once, never bounded)
    and sends a request to the longest real prefix; ties go to the least in flight."""

    def __init__(self) -> None:
        self.held: dict[str, set[int]] = {}
        self.inflight: dict[str, int] = {}
        self.where: dict[str, str] = {}

    def set_engines(self, member_ids: Sequence[str]) -> None:
        for m in member_ids:
            self.held[m] = set()
            self.inflight[m] = 0

    def route(self, request_id: str, blocks: Sequence[int], now_s: float) -> str:
        best, best_key = "", (-1, 0)
        for m, held in self.held.items():
            n = 0
            for b in blocks:
                if b not in held:
                    break
                n += 1
            key = (n, -self.inflight[m])
            if key > best_key:
                best, best_key = m, key
        self.inflight[best] += 1
        self.where[request_id] = best
        return best

    def release(self, request_id: str, now_s: float) -> None:
        m = self.where.pop(request_id, None)
        if m is not None:
            self.inflight[m] -= 1

    def stored(self, member_id: str, chain: Sequence[int], now_s: float) -> None:
        self.held[member_id].update(chain)

    def removed(self, member_id: str, blocks: Sequence[int], now_s: float) -> None:
        self.held[member_id].difference_update(blocks)


def quality(limit: int, trace: Path = TRACE) -> None:
    if not trace.exists():
        print(f"3. routing quality: trace {trace} not found, skipped")
        return
    requests = load_trace(trace, limit=limit)
    config = ReplayConfig(engines=8, capacity_blocks=1000)
    prefix = replay_in_process(requests, CoreRouter("prefix"), "prefix", config).summary()
    oracle = replay_in_process(requests, OracleRouter(), "oracle", config).summary()
    p, o = float(prefix["local_hit_rate"]), float(oracle["local_hit_rate"])
    print(f"3. routing quality, {len(requests):,} Mooncake requests on 8 engines x 1,000 blocks (in-process):")
    for name, s in (("prefix + events", prefix), ("oracle", oracle)):
        print(f"   {name:16s} hit rate {float(s['local_hit_rate']) * 100:5.1f}%  max/mean requests "
              f"{float(s['max_over_mean_requests']):.2f}  TTFT p50 {float(s['ttft_p50_ms']):7.1f} ms "
              f"p99 {float(s['ttft_p99_ms']):8.1f} ms")
    ratio = p / o if o else 0.0
    print(f"   prefix / oracle hit rate {ratio:.3f}   target >= 0.90  {'met' if ratio >= 0.9 else 'NOT met'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--trace", type=Path, default=TRACE, help="Mooncake-format trace for part 3")
    parser.add_argument("--only", choices=("ingestion", "storm", "quality"), help="run one part")
    args = parser.parse_args()
    blocks = 100_000 if args.quick else 400_000
    if args.only in (None, "ingestion"):
        ingestion(3, blocks)
    if args.only in (None, "storm"):
        asyncio.run(storm(blocks))
    if args.only in (None, "quality"):
        quality(2000 if args.quick else 8000, args.trace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
