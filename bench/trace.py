"""What routing and the cache pool buy on the public Mooncake conversation trace, in one run.

    .venv/bin/python -m bench.trace [--quick] [--trace FILE] [--out DIR] [--live-check]

In-process replay (the router's own RouterCore, simulated engines, pool model, virtual clock)
of the trace on 8 engines x 1,000 blocks: every router policy without a pool, then the
`prefix` policy with a 32,000-block pool, side by side with the bound of one infinite
cache, one LRU cache of the engines' summed memory (8,000 blocks) as the ceiling of
what routing alone could reach, and the oracle (`kvmesh/tools/replay/oracle.py`: the same load
rule with every engine's real cache), of which each policy's hit rate is printed as a share.
Prints the figures against the targets:
  prefix alone >= 50% of the infinite-cache bound (random reaches about 16%);
  prefix + 32,000-block pool >= 90% of the bound, with max/mean requests per engine <= 1.1.
`--quick` replays the first 2,000 requests only. `--live-check` also replays the first 300
requests through real processes (kvmesh bench trace --live) and prints both results.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from kvmesh.tools.processes import kvmesh_env
from kvmesh.tools.replay.core_router import CoreRouter
from kvmesh.tools.replay.metrics import ReplayResult
from kvmesh.tools.replay.oracle import OracleRouter
from kvmesh.tools.replay.pool import PoolModel
from kvmesh.tools.replay.report import print_summary, wide_console, write_json, write_plots
from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process
from kvmesh.tools.workload.trace import TraceRequest, infinite_cache_bound, load_trace

ROOT = Path(__file__).resolve().parents[1]  # the source checkout

DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / "mooncake_conversation_trace.jsonl"
POLICIES = ["random", "round-robin", "least-load", "prefix", "cache-aware", "kv-aware"]
STORAGE_BACKENDS, CAPACITY, POOL = 8, 1000, 32_000


def single_lru_ceiling(requests: list[TraceRequest], capacity: int) -> float:
    """Hit rate of one LRU cache of `capacity` blocks that sees every request."""
    cache = PoolModel(capacity)
    hits = total = 0
    for r in requests:
        hits += cache.prefix_hits(r.hash_ids)
        total += len(r.hash_ids)
        cache.put(r.hash_ids)
    return hits / total if total else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="first 2,000 requests only")
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--out", type=Path, default=None, help="write results.json and plots here")
    parser.add_argument("--live-check", action="store_true", help="also replay 150 requests through processes")
    args = parser.parse_args()
    console = wide_console()
    requests = load_trace(args.trace, limit=2000 if args.quick else None)
    bound = infinite_cache_bound(requests)
    ceiling = single_lru_ceiling(requests, STORAGE_BACKENDS * CAPACITY)
    # Routing alone cannot beat one cache of the engines' summed memory seeing every request.
    console.print(f"{args.trace.name}: {len(requests)} requests; infinite-cache bound {bound * 100:.1f}%; "
                  f"one shared LRU of {STORAGE_BACKENDS * CAPACITY:,} blocks {ceiling * 100:.1f}% "
                  f"({ceiling / bound * 100:.1f}% of the bound)")
    results: list[ReplayResult] = []
    started = time.perf_counter()
    for policy in POLICIES:
        results.append(replay_in_process(requests, CoreRouter(policy), policy,
                                         ReplayConfig(engines=STORAGE_BACKENDS, capacity_blocks=CAPACITY)))
    # The router's load gate loosened: fewer requests leave the pod that holds their prefix.
    results.append(replay_in_process(requests, CoreRouter("prefix", imbalance_abs=32), "prefix imbalance_abs=32",
                                     ReplayConfig(engines=STORAGE_BACKENDS, capacity_blocks=CAPACITY)))
    # The oracle: the same load rule with every engine's real cache (what routing could reach).
    oracle = replay_in_process(requests, OracleRouter(), "oracle",
                               ReplayConfig(engines=STORAGE_BACKENDS, capacity_blocks=CAPACITY))
    results.append(oracle)
    with_pool = replay_in_process(requests, CoreRouter("prefix"), "prefix",
                                  ReplayConfig(engines=STORAGE_BACKENDS, capacity_blocks=CAPACITY, pool_blocks=POOL))
    results.append(with_pool)
    print_summary(results, console, title=f"{STORAGE_BACKENDS} engines x {CAPACITY} blocks, in-process, "
                                          f"{time.perf_counter() - started:.1f} s wall")
    by = {r.policy: r.summary() for r in results[:-1]}
    gated = by["prefix imbalance_abs=32"]
    oracle_hit = float(by["oracle"]["total_hit_rate"])
    console.print(f"hit rate as a share of the oracle ({oracle_hit * 100:.1f}%) and of the infinite-cache bound "
                  f"({bound * 100:.1f}%), no pool:")
    for policy, s in by.items():
        hit = float(s["total_hit_rate"])
        console.print(f"  {policy:26s} {hit * 100:5.1f}%  {hit / oracle_hit * 100 if oracle_hit else 0:5.1f}% of oracle"
                      f"  {float(s['fraction_of_bound']) * 100:5.1f}% of bound")
    pool_s = with_pool.summary()
    checks = [
        ("prefix alone, fraction of bound", float(by["prefix"]["fraction_of_bound"]), ">=", 0.50),
        ("prefix imbalance_abs=32 alone, fraction of bound", float(gated["fraction_of_bound"]), ">=", 0.50),
        ("random alone, fraction of bound (about 0.16)", float(by["random"]["fraction_of_bound"]), "~", 0.16),
        ("prefix + pool, fraction of bound", float(pool_s["fraction_of_bound"]), ">=", 0.90),
        ("prefix + pool, max/mean requests per engine", float(pool_s["max_over_mean_requests"]), "<=", 1.10),
    ]
    for name, value, op, target in checks:
        ok = {">=": value >= target, "<=": value <= target, "~": abs(value - target) < 0.05}[op]
        console.print(f"  {name:48s} {value:7.3f}  target {op} {target:.2f}  {'met' if ok else 'NOT met'}")
    if args.live_check:
        _live_check(args.trace, console)
    if args.out is not None:
        write_json(results, args.out / "results.json", {"trace": str(args.trace), "ceiling_8000": ceiling})
        for path in write_plots([by_res for by_res in results if by_res.policy in ("random", "prefix")], args.out):
            console.print(f"wrote {path}")
    return 0


def _live_check(trace: Path, console) -> None:
    limit = 300
    rows = []
    for live in (False, True):
        cmd = [sys.executable, "-m", "kvmesh", "bench", "trace", str(trace), "--limit", str(limit), "--quiet",
               "--engines", "4", "--cachenodes", "2", "--capacity-blocks", "1000", "--pool-blocks", "4000",
               "--speedup", "5", *(["--live"] if live else [])]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=kvmesh_env())
        line = next((ln for ln in out.stdout.splitlines() if ln.startswith("KVMESH_BENCH_SUMMARY ")), None)
        if line is None:
            console.print(f"[red]live check failed[/red]\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
            return
        rows.append(json.loads(line.split(" ", 1)[1])[0])
    console.print(f"live check, first {limit} requests, 4 engines x 1,000 blocks, pool 4,000 blocks, speedup 5:")
    for s in rows:
        console.print(f"  {s['mode']:10s} local {s['local_hit_rate'] * 100:5.1f}%"
                      f"  pool {s['pool_hit_rate'] * 100:5.1f}%  total {s['total_hit_rate'] * 100:5.1f}%"
                      f"  TTFT p50 {s['ttft_p50_ms']:8.0f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
