"""`kvmesh bench trace FILE`: replay a Mooncake trace through router -> engine simulators.

Two modes over the same requests and the same metrics:
- in-process (default): the router's own `RouterCore`, simulated engines and a pool model on
  a virtual clock, so the whole public trace replays in seconds per policy;
- `--live`: real processes. Without `--router`, a fresh mesh is started for each policy
  (as `kvmesh up` does) and stopped afterwards; with `--router ADDR`, an already running mesh
  is used as is (its router's policy, its engines' `--speedup`, which must match).
Each policy (and each `--pool-blocks` value) runs on fresh state, one after another.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvmesh.tools.cli.credentials import add_credential_arguments, use_credentials
from kvmesh.tools.cli.up import (
    MeshSpec,
    add_mesh_arguments,
    parse_router_settings,
    pool_rate_from_args,
    spec_from_args,
    start_mesh,
    stop_mesh,
    warn_insecure,
)
from kvmesh.tools.replay.metrics import ReplayResult
from kvmesh.tools.workload.trace import TraceRequest, infinite_cache_bound, load_trace


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK")
    trace = sub.add_parser("trace", help="replay a Mooncake-format trace (or the built-in workload)",
                           description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    trace.add_argument("file", nargs="?", default=None,
                       help="trace file (JSON lines); omit (or 'builtin') for the built-in workload")
    trace.add_argument("--policy", default="prefix",
                       help="router policy, or several comma-separated (random,round-robin,least-load,prefix,"
                            "cache-aware,kv-aware)")
    trace.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    trace.add_argument("--live", action="store_true", help="replay through real processes")
    trace.add_argument("--router", default=None, help="--live: use the running mesh whose router is HOST:PORT")
    trace.add_argument("--out", type=Path, default=None, help="write results.json and PNG plots to DIR")
    trace.add_argument("--window-s", type=float, default=60.0, help="hit-rate-over-time window (trace seconds)")
    trace.add_argument("--seed", type=int, default=0, help="seed of the policies' random choices")
    trace.add_argument("--conversations", type=int, default=200, help="built-in workload: conversations")
    trace.add_argument("--max-inflight", type=int, default=512, help="--live: most requests outstanding")
    trace.add_argument("--quiet", action="store_true", help="no progress bar")
    add_mesh_arguments(trace, MeshSpec(engines=8, cachenodes=2, pool_blocks=0, speedup=10.0, base_port=0))
    add_credential_arguments(trace)  # --live --router ADDR against a mesh with TLS and a policy
    # One benchmark run may sweep pool sizes: --pool-blocks 0,32000.
    trace.set_defaults(pool_blocks="0")
    for action in trace._actions:
        if action.dest == "pool_blocks":
            action.type = str
            action.help = "cache-pool size in blocks over all cache nodes, 0 = none; comma-separate to sweep"


def _workload(args: argparse.Namespace) -> tuple[str, list[TraceRequest]]:
    if args.file in (None, "builtin"):
        from kvmesh.tools.workload.generator import WorkloadSpec, generate_workload

        reqs = generate_workload(WorkloadSpec(conversations=args.conversations, seed=args.seed))
        name = f"built-in workload ({args.conversations} conversations)"
    else:
        reqs = load_trace(args.file)
        name = str(args.file)
    if args.limit is not None:
        reqs = reqs[: max(args.limit, 0)]
    return name, reqs


def _progress(console: Console, quiet: bool) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, disable=quiet, transient=True)


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_command", None) != "trace":
        print("usage: kvmesh bench trace [FILE] [options]  (see kvmesh bench trace --help)", file=sys.stderr)
        return 2
    if not use_credentials(args, "bench"):  # a fresh mesh started with --secure uses its own instead
        return 2
    from kvmesh.tools.replay.report import wide_console

    console = wide_console()
    try:
        name, requests = _workload(args)
        pools = [int(p) for p in str(args.pool_blocks).split(",") if p.strip()]
    except (OSError, ValueError) as exc:
        console.print(f"[red]kvmesh bench trace:[/red] {exc}")
        return 2
    policies = [p.strip() for p in args.policy.split(",") if p.strip()]
    if not requests or not policies or any(p < 0 for p in pools) or not pools:
        console.print("[red]kvmesh bench trace:[/red] nothing to replay (empty trace, policy or pool list)")
        return 2
    bound = infinite_cache_bound(requests)
    console.print(f"{name}: {len(requests)} requests, {sum(len(r.hash_ids) for r in requests):,} prompt blocks, "
                  f"infinite-cache bound {bound * 100:.1f}%")
    from kvmesh.services.enginesim.timing import TimingModel
    from kvmesh.tools.replay.transfer import break_even_report

    rate = pool_rate_from_args(args)
    if args.nic_gbps <= 0:
        console.print("[red]kvmesh bench trace:[/red] --nic-gbps must be positive")
        return 2
    console.print(break_even_report(TimingModel(), rate, args.nic_gbps))
    results: list[ReplayResult] = []
    for policy in policies:
        for pool in pools:
            args.pool_blocks = pool
            if args.live:
                res = _run_live(args, policy, requests, console)
            else:
                res = _run_in_process(args, policy, requests, console, rate.gbps)
            if res is None:
                return 1
            results.append(res)
            if pool:  # the same pool behind a production NIC, for comparison (in process)
                nic = _run_in_process(args, policy, requests, console, args.nic_gbps)
                if nic is None:
                    return 1
                results.append(nic)
    from kvmesh.tools.replay.report import print_summary, write_json, write_plots

    print_summary(results, console, title=f"kvmesh bench trace: {name}")
    if args.out is not None:
        write_json(results, args.out / "results.json", {"workload": name, "command": sys.argv})
        for path in write_plots(results, args.out, args.window_s):
            console.print(f"wrote {path}")
        console.print(f"wrote {args.out / 'results.json'}")
    print("KVMESH_BENCH_SUMMARY " + json.dumps([r.summary() for r in results]), flush=True)
    return 0


def _router_knobs(args: argparse.Namespace) -> dict[str, str]:
    return dict(parse_router_settings(args.router_setting))


def _run_in_process(
    args: argparse.Namespace, policy: str, requests: list[TraceRequest], console: Console, pool_gbps: float
) -> ReplayResult | None:
    from pydantic import ValidationError

    from kvmesh.tools.replay.core_router import CoreRouter
    from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process

    try:
        router = CoreRouter(policy, seed=args.seed, **_router_knobs(args))
    except ValidationError as exc:
        console.print(f"[red]bad router setting:[/red] {exc.errors()[0]['msg']}")
        return None
    from kvmesh.services.enginesim.timing import TimingModel

    config = ReplayConfig(engines=args.engines, capacity_blocks=args.capacity_blocks, pool_blocks=args.pool_blocks,
                          block_tokens=args.block_tokens, timing=TimingModel(pool_gbps=pool_gbps))
    with _progress(console, args.quiet) as bar:
        task = bar.add_task(f"{policy} pool={args.pool_blocks} @ {pool_gbps:g} GB/s (in-process)", total=len(requests))
        return replay_in_process(requests, router, policy, config, progress=lambda n: bar.advance(task, n))


def _run_live(
    args: argparse.Namespace, policy: str, requests: list[TraceRequest], console: Console
) -> ReplayResult | None:
    from kvmesh.tools.replay.live import replay_live

    settings: dict[str, object] = {
        "pool_blocks": args.pool_blocks, "engines": args.engines, "capacity_blocks": args.capacity_blocks,
    }
    mesh = None
    try:
        if args.router:
            router, engine_ids, speedup = args.router, [], args.speedup
        else:
            spec = spec_from_args(args, policy)
            settings["pool_gbps"] = spec.pool_gbps
            if spec.tls_dir is None:
                warn_insecure(console)
            with console.status(f"starting a fresh mesh for {policy} ({spec.engines} engines) ..."):
                mesh = start_mesh(spec)
            router, engine_ids, speedup = mesh.router_address, [c.name for c in mesh.of_role("engine")], spec.speedup
        with _progress(console, args.quiet) as bar:
            task = bar.add_task(f"{policy} pool={args.pool_blocks} (live, x{speedup:g})", total=len(requests))
            result = asyncio.run(replay_live(
                requests, router, speedup, label="" if args.router else policy, engine_ids=engine_ids,
                max_inflight=args.max_inflight, progress=lambda n: bar.advance(task, n), settings=settings,
            ))
    except RuntimeError as exc:
        console.print(f"[red]live replay failed:[/red] {exc}")
        return None
    finally:
        if mesh is not None:
            stop_mesh(mesh)
    if result.settings.get("errors"):
        console.print(f"[yellow]{result.settings['errors']} requests failed, e.g. "
                      f"{result.settings['error_samples']}[/yellow]")
    return result
