"""`kvmesh up`: the whole mesh on this machine, one process per member.

Starts the metadata service, N cache nodes, the router and M engine simulators as
`python -m kvmesh ...` children (each in its own session, so a terminal's Ctrl-C reaches only
this supervisor, which then stops them in order). A child counts as up once it printed its
`KVMESH_READY` line and answers a gRPC health check; the mesh counts as up once every member
is registered. Ctrl-C or SIGTERM stops engines, router, cache nodes, then metadata, each
with SIGTERM and a grace period, and SIGKILLs whatever is still running after it: nothing is
left behind. `--demo` sends a short built-in workload through router -> engines, prints the
result table and stops.

Secure by default: every member serves and dials mutual TLS with its own certificate from a local
CA in the state folder and enforces a policy granting it what its role needs
(`kvmesh.tools.mesh_pki`); `--insecure` runs everything in plaintext, with a warning.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvmesh.tools.mesh_pki import CLIENT_ENV_FILE, SUPERVISOR, MeshCredentials
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.replay.transfer import NIC_GBPS, PoolRate, resolve_pool_rate
from kvmesh.units import format_size, parse_size


def start_child(name: str, role: str, args: Sequence[str], log_dir: Path | None = None) -> KvmeshProcess:
    """One member of the mesh (the process class tests and benchmarks use): a bounded output
    tail for error reports and, with --log-dir, a log file."""
    return KvmeshProcess(args, name=name, role=role, log_dir=log_dir, keep_lines=200, die_with_parent=True)


@dataclass(frozen=True)
class MeshSpec:
    """What `kvmesh up` starts."""

    backend: str = "memory://"
    cachenodes: int = 2
    engines: int = 2
    pool_blocks: int = 4000  # in total, over all cache nodes
    block_bytes: int = 4096
    capacity_blocks: int = 1000
    block_tokens: int = 512
    policy: str = "prefix"
    speedup: float = 1.0
    base_port: int = 7400
    host: str = "127.0.0.1"
    ttl_seconds: int = 10
    grace_seconds: float = 5.0
    start_timeout: float = 60.0
    log_level: str = "warning"
    log_dir: Path | None = None
    router_settings: tuple[tuple[str, str], ...] = ()
    engine_args: tuple[str, ...] = ()
    tls_dir: Path | None = None  # the CA, every member's certificate and the policy (None: --insecure)
    engine_namespace: str = "kvmesh"  # the cache-pool namespace engines use (and the policy grants)
    pool_gbps: float | None = None  # engines' cache-pool transfer rate (None: the engines' default)

    def address(self, offset: int) -> str:
        return f"{self.host}:{self.base_port + offset if self.base_port else 0}"

    def node_capacity_bytes(self) -> int:
        """Each node's share of the pool (the memory storage counts value bytes exactly)."""
        per_node = -(-self.pool_blocks // max(self.cachenodes, 1))
        return max(per_node, 1) * self.block_bytes


@dataclass
class Mesh:
    """The running children, in start order."""

    spec: MeshSpec
    credentials: MeshCredentials | None = None
    children: list[KvmeshProcess] = field(default_factory=list)
    metadata_address: str = ""
    router_address: str = ""

    def of_role(self, role: str) -> list[KvmeshProcess]:
        return [c for c in self.children if c.role == role]

    def dead(self) -> list[KvmeshProcess]:
        return [c for c in self.children if not c.running()]


def _common(mesh: Mesh, name: str) -> list[str]:
    spec = mesh.spec
    return ["--log-level", spec.log_level, "--grace-seconds", f"{spec.grace_seconds:g}", "--member-id", name,
            *_security(mesh, name)]


def _security(mesh: Mesh, name: str) -> list[str]:
    """Mutual TLS with `name`'s certificate and the mesh's policy, as flags (none with --insecure)."""
    return mesh.credentials.flags(name) if mesh.credentials is not None else []


def member_names(spec: MeshSpec) -> tuple[list[str], str, list[str]]:
    """The member ids (and certificate names) of the cache nodes, the router and the engines."""
    return [f"cachenode-{i}" for i in range(spec.cachenodes)], "router", [f"engine-{i}" for i in range(spec.engines)]


def mesh_credentials(spec: MeshSpec) -> MeshCredentials | None:
    """The CA, certificates and policy in `spec.tls_dir` (made or refreshed now); None with --insecure."""
    if spec.tls_dir is None:
        return None
    from kvmesh.tools.mesh_pki import prepare_mesh_credentials

    cachenodes, router, engines = member_names(spec)
    return prepare_mesh_credentials(spec.tls_dir, host=spec.host, cachenodes=cachenodes,
                                    node_capacity_bytes=spec.node_capacity_bytes(), router=router,
                                    engines=engines, engine_namespace=spec.engine_namespace)


def use_mesh_credentials(credentials: MeshCredentials | None) -> None:
    """This supervisor's own channels (health checks, the demo) present `kvmesh-up`'s certificate."""
    if credentials is None:
        return
    from kvmesh.security.client import configure_clients
    from kvmesh.security.settings import SecuritySettings

    own = credentials.issued[SUPERVISOR]
    configure_clients(SecuritySettings(tls_cert=own.cert, tls_key=own.key, tls_ca=credentials.ca_path))


def start_mesh(spec: MeshSpec) -> Mesh:
    """Starts every member and waits until each is ready and healthy; stops all on failure."""
    mesh = Mesh(spec, credentials=mesh_credentials(spec))
    use_mesh_credentials(mesh.credentials)  # this process's own channels into the mesh use mutual TLS
    try:
        _start(mesh)
    except BaseException:
        stop_mesh(mesh)
        raise
    return mesh


def _start(mesh: Mesh) -> None:
    spec = mesh.spec
    deadline = time.monotonic() + spec.start_timeout
    if spec.log_dir is not None:
        spec.log_dir.mkdir(parents=True, exist_ok=True)

    def left() -> float:
        return max(deadline - time.monotonic(), 0.1)

    md = start_child("metadata", "metadata", ["metadata", "--backend", spec.backend, "--listen", spec.address(0),
                                        "--log-level", spec.log_level, "--grace-seconds",
                                        f"{spec.grace_seconds:g}", *_security(mesh, "metadata")], spec.log_dir)
    mesh.children.append(md)
    mesh.metadata_address = md.wait_ready(left())
    member = ["--metadata", mesh.metadata_address, "--ttl-seconds", str(spec.ttl_seconds)]
    capacity = spec.node_capacity_bytes()
    cachenodes, router_name, engines = member_names(spec)
    for i, name in enumerate(cachenodes):
        mesh.children.append(start_child(name, "cachenode", [
            "cachenode", "--storage", f"memory://?capacity={capacity}", "--listen", spec.address(100 + i),
            *member, *_common(mesh, name)], spec.log_dir))
    router_flags = [f"--{k.replace('_', '-')}={v}" for k, v in spec.router_settings]
    router = start_child(router_name, "router", [
        "router", "--policy", spec.policy, "--listen", spec.address(200), "--block-size", str(spec.block_tokens),
        *router_flags, *member, *_common(mesh, router_name)], spec.log_dir)
    mesh.children.append(router)
    mesh.router_address = router.wait_ready(left())
    for c in mesh.of_role("cachenode"):
        c.wait_ready(left())
    for i, name in enumerate(engines):
        pool = ["--pool"] if spec.cachenodes and spec.pool_blocks else ["--no-pool"]
        mesh.children.append(start_child(name, "engine", [
            "enginesim", "--listen", spec.address(300 + i), "--router", mesh.router_address,
            "--capacity-blocks", str(spec.capacity_blocks), "--block-tokens", str(spec.block_tokens),
            "--block-bytes", str(spec.block_bytes), "--speedup", f"{spec.speedup:g}", *pool,
            "--namespace", spec.engine_namespace,
            *(["--pool-gbps", f"{spec.pool_gbps:g}"] if spec.pool_gbps is not None else []),
            *spec.engine_args, *member, *_common(mesh, name)], spec.log_dir))
    for c in mesh.of_role("engine"):
        c.wait_ready(left())
    asyncio.run(_wait_healthy_and_registered(mesh, deadline))


async def _wait_healthy_and_registered(mesh: Mesh, deadline: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from kvmesh.membership.listing import list_members
    from kvmesh.runtime.channels import open_channel
    from kvmesh.v1 import metadata_pb2_grpc

    for child in mesh.children:
        assert child.address is not None
        async with open_channel(child.address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while True:
                try:
                    resp = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0)
                    if resp.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except Exception:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{child.name} is not healthy")
                await asyncio.sleep(0.1)
    want = len(mesh.children) - 1  # everyone but the metadata service registers
    async with open_channel(mesh.metadata_address) as channel:
        stub = metadata_pb2_grpc.MembershipStub(channel)
        while True:
            listed, _ = await list_members(stub, timeout=5.0)
            if len(listed) >= want:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(listed)} of {want} members registered")
            await asyncio.sleep(0.1)


def stop_mesh(mesh: Mesh, timeout: float | None = None) -> None:
    """Engines, router, cache nodes, metadata: SIGTERM each group, wait, SIGKILL stragglers."""
    timeout = timeout if timeout is not None else mesh.spec.grace_seconds + 10.0
    for role in ("engine", "router", "cachenode", "metadata"):
        tier = mesh.of_role(role)
        for c in tier:
            c.send_term()
        end = time.monotonic() + timeout
        for c in tier:
            if not c.wait(max(end - time.monotonic(), 0.1)):
                c.kill()
    for c in mesh.children:
        c.kill()
        c.close()


def members_table(mesh: Mesh) -> Table:
    table = Table(title=f"kvmesh up: {len(mesh.children)} processes (metadata backend {mesh.spec.backend})")
    for col in ("member", "role", "address", "pid", "details"):
        table.add_column(col)
    spec = mesh.spec
    details = {
        "metadata": spec.backend,
        "cachenode": f"memory, {format_size(spec.node_capacity_bytes())}",
        "router": f"policy {spec.policy}",
        "engine": f"{spec.capacity_blocks} blocks x {spec.block_tokens} tokens, speedup {spec.speedup:g}"
        + (f", pool {spec.pool_gbps:g} GB/s" if spec.pool_gbps is not None else ""),
    }
    for c in mesh.children:
        table.add_row(c.name, c.role, c.address or "-", str(c.pid), details[c.role])
    return table


# ---- command line -----------------------------------------------------------------------------


def add_mesh_arguments(parser: argparse.ArgumentParser, defaults: MeshSpec = MeshSpec()) -> None:
    """Flags describing a mesh (shared with `kvmesh bench trace --live`)."""
    parser.add_argument("--backend", default=defaults.backend,
                        help="metadata backend: memory:// (default), etcd://HOST:PORT, redis://HOST:PORT/DB")
    parser.add_argument("--cachenodes", type=int, default=defaults.cachenodes, help="cache nodes to start")
    parser.add_argument("--engines", type=int, default=defaults.engines, help="engine simulators to start")
    parser.add_argument("--pool-blocks", type=int, default=defaults.pool_blocks,
                        help="cache-pool size in blocks, over all cache nodes (0: no pool)")
    parser.add_argument("--block-bytes", default=str(defaults.block_bytes),
                        help="real bytes per block moved to and from the pool (accepts 4KiB)")
    parser.add_argument("--capacity-blocks", type=int, default=defaults.capacity_blocks,
                        help="GPU prefix-cache blocks per engine")
    parser.add_argument("--block-tokens", type=int, default=defaults.block_tokens, help="tokens per block")
    parser.add_argument("--speedup", type=float, default=defaults.speedup,
                        help="engines run simulated time this many times faster than real time")
    parser.add_argument("--base-port", type=int, default=defaults.base_port,
                        help="metadata on BASE, cache nodes BASE+100+i, router BASE+200, engines BASE+300+i "
                             "(0: free ports)")
    parser.add_argument("--log-level", default=defaults.log_level, choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-dir", type=Path, default=None, help="write each child's output to DIR/NAME.log")
    parser.add_argument("--router-setting", action="append", default=[], metavar="KEY=VALUE",
                        help="extra router flag, e.g. imbalance_abs=32 (repeatable)")
    parser.add_argument("--start-timeout", type=float, default=defaults.start_timeout,
                        help="seconds the whole mesh may take to come up")
    parser.add_argument("--pool-gbps", type=float, default=None,
                        help="cache-pool transfer rate GB/s the simulated engines fetch at (default: the rate a "
                             "benchmark measured, from --pool-rate-file)")
    parser.add_argument("--pool-rate-file", type=Path, default=None,
                        help="JSON file a benchmark wrote the measured rate to (python -m bench.fastpath "
                             "--write-rate; default $KVMESH_POOL_RATE_FILE or ~/.cache/kvmesh/pool-rate.json)")
    parser.add_argument("--nic-gbps", type=float, default=NIC_GBPS,
                        help="production NIC rate GB/s shown next to the measured one (default 12.5: 100 Gb/s)")

    parser.add_argument("--insecure", action="store_true",
                        help="plaintext, no authentication, no policy: anyone who reaches the ports controls "
                             "the mesh (default: mutual TLS and a policy, credentials in --state-dir)")
    parser.add_argument("--secure", action="store_true", help=argparse.SUPPRESS)  # the default; kept for scripts
    parser.add_argument("--state-dir", type=Path, default=None,
                        help="where the mesh's CA, certificates and policy live (default "
                             "$XDG_STATE_HOME/kvmesh/pki, else ~/.local/state/kvmesh/pki)")


def pool_rate_from_args(args: argparse.Namespace) -> PoolRate:
    """--pool-gbps, else the measured rate (SystemExit with the reason when the file is bad)."""
    try:
        return resolve_pool_rate(args.pool_gbps, args.pool_rate_file)
    except ValueError as exc:
        raise SystemExit(f"kvmesh: {exc}") from None


def parse_router_settings(items: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """`--router-setting KEY=VALUE` items, checked against the router's own settings."""
    from kvmesh.services.router.settings import RouterSettings

    known = set(RouterSettings.model_fields)
    out: list[tuple[str, str]] = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SystemExit(f"kvmesh: --router-setting wants KEY=VALUE, got {item!r}")
        if key not in known or key in ("policy", "metadata", "listen", "member_id"):
            raise SystemExit(f"kvmesh: --router-setting {key!r} is not a router setting this command lets you set")
        out.append((key, value.strip()))
    return tuple(out)


def spec_from_args(args: argparse.Namespace, policy: str) -> MeshSpec:
    settings = parse_router_settings(args.router_setting)
    for name in ("cachenodes", "engines", "pool_blocks", "capacity_blocks", "block_tokens"):
        if getattr(args, name) < (1 if name in ("engines", "capacity_blocks", "block_tokens") else 0):
            raise SystemExit(f"kvmesh: --{name.replace('_', '-')} is out of range")
    if args.speedup <= 0:
        raise SystemExit("kvmesh: --speedup must be positive")
    if args.nic_gbps <= 0:
        raise SystemExit("kvmesh: --nic-gbps must be positive")
    if args.insecure and args.secure:
        raise SystemExit("kvmesh: --insecure and --secure contradict each other")
    return MeshSpec(
        backend=args.backend,
        cachenodes=args.cachenodes,
        engines=args.engines,
        pool_blocks=args.pool_blocks,
        block_bytes=parse_size(args.block_bytes),
        capacity_blocks=args.capacity_blocks,
        block_tokens=args.block_tokens,
        policy=policy,
        speedup=args.speedup,
        base_port=args.base_port,
        log_level=args.log_level,
        log_dir=args.log_dir,
        router_settings=settings,
        start_timeout=args.start_timeout,
        pool_gbps=pool_rate_from_args(args).gbps,
        tls_dir=None if args.insecure else _state_dir(args),
    )


def _state_dir(args: argparse.Namespace) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "kvmesh" / "pki"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_mesh_arguments(parser)
    parser.add_argument("--policy", default="prefix", help="router policy")
    parser.add_argument("--demo", action="store_true",
                        help="run a short built-in workload through the mesh, print the results and stop")
    parser.add_argument("--demo-conversations", type=int, default=12, help="conversations in the demo workload")
    parser.add_argument("--demo-speedup", type=float, default=20.0, help="--speedup used by --demo")
    parser.add_argument("--demo-capacity-blocks", type=int, default=64,
                        help="--capacity-blocks used by --demo (small, so that where a request goes matters)")


class _Stop:
    """Signal handlers only set this flag (the main thread polls it)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, signum: int, frame: object) -> None:
        self.event.set()


def run(args: argparse.Namespace) -> int:
    from kvmesh.tools.replay.report import wide_console

    console = wide_console()
    if args.demo and args.speedup == MeshSpec.speedup:
        args.speedup = args.demo_speedup
    if args.demo and args.capacity_blocks == MeshSpec.capacity_blocks:
        args.capacity_blocks = args.demo_capacity_blocks
    spec = spec_from_args(args, args.policy)
    from kvmesh.services.enginesim.timing import TimingModel
    from kvmesh.tools.replay.transfer import break_even_report

    console.print(break_even_report(TimingModel(), pool_rate_from_args(args), args.nic_gbps))
    if spec.tls_dir is None:
        warn_insecure(console)
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    mesh: Mesh | None = None
    try:
        console.print(f"starting the mesh: metadata ({spec.backend}), {spec.cachenodes} cache nodes, "
                      f"router ({spec.policy}), {spec.engines} engine simulators ...")
        mesh = start_mesh(spec)
        console.print(members_table(mesh))
        if mesh.credentials is not None:
            console.print(connect_help(mesh))
        pids = ",".join(str(c.pid) for c in mesh.children)
        # One line tools and tests wait for (address = the router, where requests go).
        print(f"KVMESH_READY service=mesh address={mesh.router_address} metadata={mesh.metadata_address} "
              f"pids={pids}", flush=True)
        if args.demo:
            return _demo(mesh, args, console, stop)
        console.print("mesh is up; Ctrl-C stops it")
        while not stop.event.wait(0.5):
            dead = mesh.dead()
            if dead:
                for c in dead:
                    console.print(f"[red]{c.name} exited with {c.returncode}[/red]\n{c.tail(20)}")
                return 1
        console.print("stopping ...")
        return 0
    except RuntimeError as exc:
        console.print(f"[red]kvmesh up failed:[/red] {exc}")
        return 1
    finally:
        if mesh is not None:
            stop_mesh(mesh)
            console.print("all members stopped")
        for sig, handler in previous.items():
            signal.signal(sig, handler)


INSECURE_WARNING = ("WARNING: --insecure: every port speaks plaintext and nothing is authenticated; anyone who "
                    "can reach them can register members, read and overwrite cached blocks and steer routing")


def warn_insecure(console: Console) -> None:
    """Loud, on both streams: a log collector keeps stderr, a person reads the terminal."""
    console.print(f"[bold red]{INSECURE_WARNING}[/bold red]")
    print(INSECURE_WARNING, file=sys.stderr, flush=True)


def connect_help(mesh: Mesh) -> str:
    """Where the credentials are and how a client connects (as `kvmesh-cli`)."""
    creds = mesh.credentials
    assert creds is not None
    env = " ".join(f"{k}={v}" for k, v in creds.client_env().items())
    return (f"mutual TLS on, policy enforced: CA {creds.ca_path}, certificates and policy {creds.policy} "
            f"in {creds.directory}\n"
            f"connect as kvmesh-cli (may route and list members): . {creds.directory / CLIENT_ENV_FILE}\n"
            f"  (that is: {env}; or the same files as --tls-ca/--tls-cert/--tls-key)\n"
            f"  then: kvmesh members --metadata {mesh.metadata_address}; "
            f"kvmesh route --router {mesh.router_address} --text hello")


def _demo(mesh: Mesh, args: argparse.Namespace, console: Console, stop: _Stop) -> int:
    from kvmesh.tools.replay.live import replay_live
    from kvmesh.tools.replay.report import print_summary
    from kvmesh.tools.workload.generator import WorkloadSpec, generate_workload
    from kvmesh.tools.workload.trace import infinite_cache_bound

    workload = generate_workload(WorkloadSpec(conversations=args.demo_conversations, seed=1))
    console.print(f"demo: {len(workload)} requests from {args.demo_conversations} generated conversations "
                  f"(shared system prompts, multi-turn, tool-use branches), speedup {mesh.spec.speedup:g}")
    result = asyncio.run(replay_live(
        workload, mesh.router_address, mesh.spec.speedup, label=mesh.spec.policy,
        engine_ids=[c.name for c in mesh.of_role("engine")], stop=stop.event,
        settings={"pool_blocks": mesh.spec.pool_blocks, "engines": mesh.spec.engines,
                  "capacity_blocks": mesh.spec.capacity_blocks},
    ))
    result.bound = infinite_cache_bound(workload)
    # The same requests without kvmesh's help: random routing, no pool (simulated in process).
    from kvmesh.services.enginesim.timing import TimingModel
    from kvmesh.tools.replay.core_router import CoreRouter
    from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process

    spec = mesh.spec
    baseline = replay_in_process(
        workload, CoreRouter("random"), "random (baseline)",
        ReplayConfig(engines=spec.engines, capacity_blocks=spec.capacity_blocks, block_tokens=spec.block_tokens),
    )
    rows = [result, baseline]
    if spec.pool_blocks and spec.cachenodes:
        # The same mesh had its pool been behind a production NIC (simulated in process).
        nic = replay_in_process(
            workload, CoreRouter(spec.policy), f"{spec.policy} @ {args.nic_gbps:g} GB/s NIC",
            ReplayConfig(engines=spec.engines, capacity_blocks=spec.capacity_blocks, block_tokens=spec.block_tokens,
                         pool_blocks=spec.pool_blocks, timing=TimingModel(pool_gbps=args.nic_gbps)),
        )
        nic.settings["pool_gbps"] = args.nic_gbps
        rows.append(nic)
    result.settings["pool_gbps"] = spec.pool_gbps
    print_summary(rows, console, title="kvmesh demo (simulated times)")
    live, base = result.summary(), baseline.summary()
    console.print(
        f"kvmesh served {float(live['total_hit_rate']) * 100:.0f}% of prompt blocks from cache "
        f"(random routing without a pool: {float(base['total_hit_rate']) * 100:.0f}%); "
        f"TTFT p50 {float(live['ttft_p50_ms']):.0f} ms vs {float(base['ttft_p50_ms']):.0f} ms"
    )
    return 0 if result.records and not result.settings.get("errors") else 1
