"""kvmesh behind a real Envoy (and through its own `Route` API) against sglang-router 0.3.2, side by side.

    KVMESH_VENVS=/work/cache/venvs .venv/bin/python -m bench.gateway [--engines 4] [--trace-limit 300]

Every target routes the same requests to fresh simulated engines (`kvmesh enginesim --http-listen`,
OpenAI HTTP, a real LRU prefix cache of `--capacity-blocks`, prefill time proportional to the
uncached part of the prompt, simulated time `--speedup` times faster):
- `sglang cache_aware`: `python -m sglang_router.launch_router --policy cache_aware` (its own venv);
- `kvmesh envoy`: Envoy → the router's ext_proc endpoint picker (`--policy prefix`) → engine;
- `kvmesh Route`: the client asks `Router.Route` over gRPC, posts to the chosen engine, `Release`s;
- `kvmesh envoy+events`: as `kvmesh envoy`, but the router registers itself, so the engines find it
  in the membership and stream their KV events (blocks stored, evicted) to it: the router then
  knows what each engine holds instead of guessing it from its own routes.
The first three run without KV events, as sglang-router does. `--targets` picks some of them.

Workloads, replayed open-loop at their own timestamps divided by the speedup: the built-in
multi-turn agentic workload (`kvmesh.tools.workload`) and the first `--trace-limit` requests of the
Mooncake conversation trace. Each 512-token block id becomes a 64-byte text block, so prompts that
share blocks share text prefixes for every router alike.

Figures: prompt-cache hit rate (the engines' `cached_tokens`), max/mean requests per engine, and,
with engines that answer at once, routing requests/s (closed loop) and the latency each gateway
adds at 500 requests/s over calling an engine directly (p50/p99, median of interleaved rounds).
Targets are printed next to the figures: hit rate >= sglang-router's (with KV events: + 10 points),
max/mean <= 1.3, p99 added <= 2 ms at 500 req/s through Envoy. Each workload's infinite-cache bound
(the hit rate of one engine that never evicts) is printed too: no router can beat it. So is the hit
rate of one LRU cache as large as all the engines together, a reference for what eviction leaves.
`Route` over gRPC against a no-op handler is `bench/router.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvmesh.tools.replay.pool import PoolModel
from kvmesh.tools.testing.envoy import EnvoyGateway, start_envoy
from kvmesh.tools.testing.integrations import integration_python
from kvmesh.tools.testing.mesh import MeshHandle, process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.workload.generator import WorkloadSpec, generate_workload
from kvmesh.tools.workload.trace import TraceRequest, infinite_cache_bound, load_trace
from kvmesh.v1 import router_pb2

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
if not DEFAULT_TRACE.exists():
    DEFAULT_TRACE = Path("/work/shared/traces/mooncake_conversation_trace.jsonl")
MODEL = "sim"
TEXT_BLOCK = 64  # bytes: the router's --text-block-bytes and the engines'

TARGETS = ("sglang cache_aware", "kvmesh envoy", "kvmesh Route", "kvmesh envoy+events")
EVENTS_MARGIN = 0.10  # the events target: hit rate >= sglang-router's + 10 points

Send = Callable[[aiohttp.ClientSession, dict[str, Any]], Awaitable[tuple[int, dict[str, str], Any]]]


def pooled_lru_hit_rate(requests: Sequence[TraceRequest], capacity_blocks: int) -> float:
    """Hit rate of one LRU cache as large as all the engines together, fed in arrival order: a
    reference for how much a workload's reuse survives eviction (not a bound: a router that
    partitions prompts well can beat one shared LRU)."""
    cache, hit, total = PoolModel(capacity_blocks), 0, 0
    for req in requests:
        hit += cache.prefix_hits(req.hash_ids)
        total += len(req.hash_ids)
        cache.put(req.hash_ids)
    return hit / total if total else 0.0


def block_text(block: int) -> str:
    """64 bytes of text standing for one 512-token block."""
    return (f"<{block:x}>" * TEXT_BLOCK)[:TEXT_BLOCK]


def body_of(req: TraceRequest, max_tokens: int) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "".join(block_text(b) for b in req.hash_ids),
            "max_tokens": max(1, min(req.output_length, max_tokens))}


@dataclass
class RunResult:
    target: str
    workload: str
    prompt_tokens: int = 0
    cached_tokens: int = 0
    per_engine: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    wall_s: float = 0.0
    note: str = ""

    @property
    def hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    def max_over_mean(self, engines: int) -> float:
        total = sum(self.per_engine.values())
        return max(self.per_engine.values()) / (total / engines) if total else 0.0


# ---- targets ---------------------------------------------------------------------------------------
async def post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    async with http.post(url, json=body) as resp:
        doc = await resp.json(content_type=None)
        return resp.status, dict(resp.headers), doc


def via_url(url: str) -> Send:
    async def send(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        return await post(http, url + "/v1/completions", body)
    return send


def via_route(mesh: MeshHandle, urls: dict[str, str]) -> Send:
    """The client-side gateway: Route (text prompt) → POST to the engine's OpenAI face → Release."""
    stub = mesh.router_stub()
    ids = iter(range(1 << 62))

    async def send(http: aiohttp.ClientSession, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
        rid = f"b{next(ids)}"
        decision = await stub.Route(router_pb2.RouteRequest(request_id=rid, model=MODEL, text=body["prompt"]))
        try:
            return await post(http, f"http://{urls[decision.member_id]}/v1/completions", body)
        finally:
            await stub.Release(router_pb2.ReleaseRequest(request_id=rid))
    return send


def picker_address(mesh: MeshHandle) -> str:
    return str(mesh.member("router-0").settings["ext_proc_listen"])


def engines_mesh(
    args: argparse.Namespace, speedup: float, router: bool, events: bool = False
) -> contextlib.AbstractAsyncContextManager[MeshHandle]:
    """Fresh engines (and a router). With `events` the router registers itself (ROLE_ROUTER), so the
    engines find it in the membership and stream their KV events to it."""
    engine = {"http_listen": "127.0.0.1:0", "pool": False, "block_tokens": 512, "text_block_bytes": TEXT_BLOCK,
              "capacity_blocks": args.capacity_blocks, "speedup": speedup, "model": MODEL}
    router_settings = {"ext_proc_listen": f"127.0.0.1:{free_port()}", "policy": args.policy,
                       "text_block_bytes": TEXT_BLOCK, "register_self": events}
    if args.share_weight is not None:
        router_settings["share_weight"] = args.share_weight
    return process_mesh(routers=1 if router else 0, engines=args.engines, engine_settings=engine,
                        router_settings=router_settings, timeout=None, ready_timeout=90)


async def http_addresses(mesh: MeshHandle) -> dict[str, str]:
    members = await mesh.wait_members("engine", len(mesh.of_role("engine")), timeout=60)
    return {m.id: m.labels["openai-address"] for m in members}


async def wait_router_members(mesh: MeshHandle, count: int) -> None:
    async def check() -> bool:
        stats = await mesh.router_stub().Stats(router_pb2.RouterStatsRequest())
        assert stats.members == count
        return True
    await eventually(check, timeout=30, interval=0.1, what="router sees the engines")


async def check_events(mesh: MeshHandle, urls: dict[str, str]) -> str:
    """That the engines' KV events reached the router and name the blocks the router cuts from text.

    After the replay: events were applied; then a probe prompt posted to one engine directly (not
    routed) brings one more event, after which `Route` finds the probe whole on that engine. A pod
    that sends events is never credited with blocks from routes, so that match comes from its
    events alone. Raises when any of this fails, so a silent failure shows.
    """
    stub = mesh.router_stub()
    stats = await stub.Stats(router_pb2.RouterStatsRequest())
    if stats.events_applied == 0:
        raise RuntimeError(f"no KV event reached the router during the replay (ignored: {stats.events_ignored})")
    member, url = next(iter(urls.items()))
    prompt = "".join(block_text((1 << 60) + i) for i in range(4))
    async with aiohttp.ClientSession() as http:
        status, _, _ = await post(http, f"http://{url}/v1/completions",
                                  {"model": MODEL, "prompt": prompt, "max_tokens": 1})
    if status != 200:
        raise RuntimeError(f"probe request to {member} failed: HTTP {status}")

    async def more_events() -> bool:
        now = await stub.Stats(router_pb2.RouterStatsRequest())
        return now.events_applied > stats.events_applied

    await eventually(more_events, timeout=10, interval=0.1, what="the probe's KV event")
    seen: list[router_pb2.RouteResponse] = []

    async def found() -> bool:
        rid = f"probe{len(seen)}"
        seen.append(await stub.Route(router_pb2.RouteRequest(request_id=rid, model=MODEL, text=prompt)))
        await stub.Release(router_pb2.ReleaseRequest(request_id=rid))
        return seen[-1].member_id == member and seen[-1].matched_blocks == seen[-1].total_blocks == 4

    try:
        await eventually(found, timeout=5, interval=0.1, what="the probe's blocks in the router's tree")
    except TimeoutError as exc:
        raise RuntimeError(
            f"the router's tree does not hold the probe's blocks on {member}: Route chose {seen[-1].member_id} "
            f"matching {seen[-1].matched_blocks}/{seen[-1].total_blocks} blocks (event ids != text-block ids?)"
        ) from exc
    return (f"events applied {stats.events_applied}, ignored {stats.events_ignored}, tree nodes {stats.tree_nodes}; "
            f"a probe posted to one engine is found whole on it by Route")


def launch_sglang(urls: Sequence[str], workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    """`sglang_router.launch_router --policy cache_aware` on 127.0.0.1 (both of its listeners)."""
    python = integration_python("sglang")
    port, prom = free_port(), free_port()
    with open(workdir / f"sglang-{port}.log", "wb") as log:
        proc = subprocess.Popen(
            [str(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--policy", "cache_aware",
             "--log-level", "warn", "--worker-urls", *[f"http://{u}" for u in urls]],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    return proc, port


@contextlib.asynccontextmanager
async def sglang_router(urls: Sequence[str], workdir: Path) -> AsyncIterator[str]:
    proc, port = await asyncio.to_thread(launch_sglang, urls, workdir)
    url = f"http://127.0.0.1:{port}"

    def registered() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"sglang-router exited: {(workdir / f'sglang-{port}.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/workers", timeout=2) as r:
                doc = json.loads(r.read())
        except OSError:
            return False
        workers = doc.get("workers", doc) if isinstance(doc, dict) else doc
        return len(workers) >= len(urls)

    try:
        deadline = time.monotonic() + 90
        while not await asyncio.to_thread(registered):
            if time.monotonic() > deadline:
                raise TimeoutError("sglang-router workers did not register")
            await asyncio.sleep(0.2)
        yield url
    finally:
        await asyncio.to_thread(stop_process, proc)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


# ---- replay ----------------------------------------------------------------------------------------
async def replay(send: Send, requests: Sequence[TraceRequest], speedup: float, max_tokens: int,
                 result: RunResult, concurrency: int = 64) -> RunResult:
    """Open loop at the trace's own times / speedup (at most `concurrency` outstanding)."""
    gate = asyncio.Semaphore(concurrency)
    t0 = requests[0].timestamp_ms if requests else 0.0
    start = time.perf_counter()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def one(req: TraceRequest) -> None:
            delay = (req.timestamp_ms - t0) / 1000.0 / speedup - (time.perf_counter() - start)
            if delay > 0:
                await asyncio.sleep(delay)
            async with gate:
                try:
                    status, headers, doc = await send(http, body_of(req, max_tokens))
                except (aiohttp.ClientError, TimeoutError, OSError):
                    result.errors += 1
                    return
            if status != 200:
                result.errors += 1
                return
            usage = doc["usage"]
            result.prompt_tokens += usage["prompt_tokens"]
            result.cached_tokens += usage["prompt_tokens_details"]["cached_tokens"]
            result.per_engine[headers.get("x-kvmesh-engine", "?")] += 1

        await asyncio.gather(*(one(r) for r in requests))
    result.wall_s = time.perf_counter() - start
    return result


# ---- gateway overhead ------------------------------------------------------------------------------
async def closed_loop_rate(send: Send, seconds: float, concurrency: int) -> float:
    done = 0
    body = {"model": MODEL, "prompt": block_text(1) * 4, "max_tokens": 1}
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as http:
        async def worker() -> None:
            nonlocal done
            while time.perf_counter() < deadline:
                status, _, _ = await send(http, body)
                done += status == 200
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return done / (time.perf_counter() - start)


async def open_loop_latencies(send: Send, rate: float, seconds: float) -> list[float]:
    """Latency (ms) of requests sent at a fixed rate, each its own small prompt."""
    out: list[float] = []
    n = int(rate * seconds)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256)) as http:
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, i / rate - (time.perf_counter() - start)))
            body = {"model": MODEL, "prompt": block_text(i) * 4, "max_tokens": 1}
            t = time.perf_counter()
            status, _, _ = await send(http, body)
            if status == 200:
                out.append((time.perf_counter() - t) * 1000.0)

        await asyncio.gather(*(one(i) for i in range(n)))
    return out


def pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100.0 * len(ordered)))]


# ---- main ------------------------------------------------------------------------------------------
def describe_bounds(args: argparse.Namespace, requests: Sequence[TraceRequest]) -> str:
    capacity = args.engines * args.capacity_blocks
    return (f"infinite-cache bound {infinite_cache_bound(requests) * 100:.1f}%, one LRU of {capacity} blocks "
            f"{pooled_lru_hit_rate(requests, capacity) * 100:.1f}%")


async def quality(
    args: argparse.Namespace, workdir: Path
) -> tuple[list[RunResult], dict[str, tuple[float, str]]]:
    """Every target on every workload; also each workload's (infinite-cache bound, bounds line)."""
    workloads = {
        "agentic": generate_workload(WorkloadSpec(conversations=args.conversations, seed=args.seed)),
        "mooncake": load_trace(args.trace, limit=args.trace_limit),
    }
    bounds = {name: (infinite_cache_bound(requests), describe_bounds(args, requests))
              for name, requests in workloads.items()}
    results: list[RunResult] = []
    for name, requests in workloads.items():
        print(f"  {name}: {len(requests)} requests, {bounds[name][1]}", flush=True)
        for target in args.targets:
            print(f"  {name}: {target} ...", flush=True)
            events = target == "kvmesh envoy+events"
            async with engines_mesh(args, args.speedup, router=target != "sglang cache_aware", events=events) as mesh:
                urls = await http_addresses(mesh)
                result = RunResult(target, name)
                if target == "sglang cache_aware":
                    async with sglang_router(list(urls.values()), workdir) as url:
                        await replay(via_url(url), requests, args.speedup, args.max_tokens, result)
                elif target in ("kvmesh envoy", "kvmesh envoy+events"):
                    await wait_router_members(mesh, args.engines)
                    envoy = await asyncio.to_thread(start_envoy, workdir, picker_address(mesh))
                    try:
                        await replay(via_url(envoy.url), requests, args.speedup, args.max_tokens, result)
                    finally:
                        envoy.stop()
                    if events:
                        result.note = await check_events(mesh, urls)
                        print(f"    {result.note}", flush=True)
                else:
                    await wait_router_members(mesh, args.engines)
                    await replay(via_route(mesh, urls), requests, args.speedup, args.max_tokens, result)
                results.append(result)
    return results, bounds


async def overhead(args: argparse.Namespace, workdir: Path) -> dict[str, dict[str, float]]:
    """Engines that answer at once: what each gateway adds, in interleaved rounds."""
    figures: dict[str, dict[str, list[float]]] = {}
    async with engines_mesh(args, 1e6, router=True) as mesh:
        urls = await http_addresses(mesh)
        await wait_router_members(mesh, args.engines)
        envoy: EnvoyGateway = await asyncio.to_thread(start_envoy, workdir, picker_address(mesh))
        try:
            async with sglang_router(list(urls.values()), workdir) as sglang_url:
                first = next(iter(urls.values()))
                targets: dict[str, Send] = {
                    "direct (one engine)": via_url(f"http://{first}"),
                    "kvmesh envoy": via_url(envoy.url),
                    "kvmesh Route": via_route(mesh, urls),
                    "sglang cache_aware": via_url(sglang_url),
                }
                for _ in range(args.rounds):
                    for name, send in targets.items():
                        f = figures.setdefault(name, {"rps": [], "p50": [], "p99": [], "rate": []})
                        f["rps"].append(await closed_loop_rate(send, args.seconds, 32))
                    # Latency below saturation: a rate every target sustains (at most --rate).
                    rate = min(args.rate, 0.5 * min(f["rps"][-1] for f in figures.values()))
                    for name, send in targets.items():
                        f = figures[name]
                        lat = await open_loop_latencies(send, rate, args.seconds)
                        f["p50"].append(pct(lat, 50))
                        f["p99"].append(pct(lat, 99))
                        f["rate"].append(rate)
        finally:
            envoy.stop()
    return {name: {k: statistics.median(v) for k, v in f.items()} for name, f in figures.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--capacity-blocks", type=int, default=400, help="each engine's prefix cache, in blocks")
    parser.add_argument("--speedup", type=float, default=20.0)
    parser.add_argument("--policy", default="prefix", help="kvmesh router policy")
    parser.add_argument("--share-weight", type=float, default=None, help="kvmesh router --share-weight (0: off)")
    parser.add_argument("--conversations", type=int, default=60, help="agentic workload size")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--trace-limit", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=64, help="cap on each request's output tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=500.0, help="open-loop rate of the latency rounds")
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each overhead measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--targets", default=",".join(TARGETS),
                        help=f"comma list of quality targets (default: all of {', '.join(TARGETS)})")
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    args = parser.parse_args()
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = set(args.targets) - set(TARGETS)
    if unknown or not args.targets:
        parser.error(f"--targets: unknown {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    os.environ.setdefault("KVMESH_LOG_LEVEL", "warning")
    with tempfile.TemporaryDirectory(prefix="kvmesh-gateway-") as tmp:
        workdir = Path(tmp)
        if not args.skip_quality:
            share = "" if args.share_weight is None else f" --share-weight {args.share_weight:g}"
            print(f"quality: {args.engines} engines x {args.capacity_blocks} blocks, speedup {args.speedup:g}, "
                  f"kvmesh --policy {args.policy}{share}; targets: {', '.join(args.targets)}")
            results, bounds = asyncio.run(quality(args, workdir))
            print(f"{'workload':9s} {'target':20s} {'hit rate':>9s} {'max/mean':>9s} {'errors':>6s} {'wall':>7s}")
            for r in results:
                print(f"{r.workload:9s} {r.target:20s} {r.hit_rate * 100:8.1f}% {r.max_over_mean(args.engines):9.3f}"
                      f" {r.errors:6d} {r.wall_s:6.1f}s")
            for workload, (_, line) in bounds.items():
                print(f"  {workload}: {line}")
            for workload, (bound, _) in bounds.items():
                rows = {r.target: r for r in results if r.workload == workload}
                if "sglang cache_aware" not in rows:
                    continue
                peer = rows["sglang cache_aware"].hit_rate
                for target in TARGETS[1:]:
                    if target not in rows:
                        continue
                    r = rows[target]
                    margin = EVENTS_MARGIN if target == "kvmesh envoy+events" else 0.0
                    want = peer + margin
                    ok_hit = r.hit_rate >= want
                    ok_bal = r.max_over_mean(args.engines) <= 1.3
                    aim = f">= sglang + {margin * 100:.0f} points = {want * 100:.2f}%" if margin else ">="
                    why = f"; above the infinite-cache bound {bound * 100:.2f}%: out of reach" if want > bound else ""
                    print(f"  {workload} {target}: hit {r.hit_rate * 100:.2f}% vs sglang {peer * 100:.2f}% "
                          f"(target {aim}{why}) {'met' if ok_hit else 'NOT met'}; max/mean "
                          f"{r.max_over_mean(args.engines):.3f} (target <= 1.3) {'met' if ok_bal else 'NOT met'}")
        if not args.skip_overhead:
            print(f"overhead: engines answer at once; {args.rounds} interleaved rounds of {args.seconds:g} s; "
                  f"latency at {args.rate:g} req/s open loop")
            fig = asyncio.run(overhead(args, workdir))
            base = fig["direct (one engine)"]
            print(f"{'target':20s} {'req/s':>8s} {'at req/s':>8s} {'p50 ms':>8s} {'p99 ms':>8s} {'+p50 ms':>8s}"
                  f" {'+p99 ms':>8s}")
            for name, f in fig.items():
                print(f"{name:20s} {f['rps']:8.0f} {f['rate']:8.0f} {f['p50']:8.2f} {f['p99']:8.2f}"
                      f" {f['p50'] - base['p50']:8.2f} {f['p99'] - base['p99']:8.2f}")
            added, rate = fig["kvmesh envoy"]["p99"] - base["p99"], fig["kvmesh envoy"]["rate"]
            print(f"  kvmesh envoy added p99: {added:.2f} ms at {rate:.0f} req/s (target <= 2 ms at 500 req/s) "
                  f"{'met' if added <= 2.0 and rate >= 500 else 'NOT met'}"
                  f"{'' if rate >= 500 else ' (this machine cannot offer 500 req/s below saturation)'}")
            envoy_vs_route = fig["kvmesh envoy"]["rps"] / fig["kvmesh Route"]["rps"]
            print(f"  routing req/s through Envoy / through Route: {envoy_vs_route:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
