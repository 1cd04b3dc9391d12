"""The cost of mutual TLS: `Route` throughput and the cache node's gRPC data path, with and without it.

    .venv/bin/python -m bench.security            # 5 rounds
    .venv/bin/python -m bench.security --quick    # 3 shorter rounds

Data path: two real `kvmesh cachenode` processes (memory storage), one plaintext, one with mutual
TLS (a CA made for the run), BatchPut/BatchGet of 2 MiB values with 16 in flight, as the client
library calls them. Route: two in-process routers over one filled prefix tree (100,000 blocks,
64 pods), plaintext and mutual TLS, 64 concurrent unary calls. Rounds alternate between plaintext
and TLS (the machine's background load drifts; alternating keeps the comparison fair); the ratio
is the median of each round's TLS/plaintext ratio. Targets (issue 12): at most 15% less
throughput with mTLS on the data path at 2 MiB values, at most 10% less on `Route`.

On a shared, oversubscribed machine wall-clock throughput is mostly noise, so the CPU time each
side spent (server process + client, from /proc and `time.process_time`) per GB or per request is
printed too: on a machine where these paths are CPU-bound, plaintext CPU / mTLS CPU is the
throughput ratio to expect.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.cachenode import GrpcSystem, drive
from bench.router import BenchService, Workload, fill, make_core, unary_throughput
from kvmesh.runtime.server import ServerRuntime
from kvmesh.security.client import configure_clients
from kvmesh.security.settings import SecuritySettings
from kvmesh.services.router.router_api import RouterApi
from kvmesh.services.router.settings import RouterSettings
from kvmesh.tools.certs import CA, issue, make_ca, tls_flags
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.units import format_size
from kvmesh.v1 import router_pb2

VALUE = 2 * 1024**2
CHUNK = 4 * 1024**2
IN_FLIGHT = 16  # operations in flight, as bench.cachenode runs single values
TARGET_DATA = 0.85
TARGET_ROUTE = 0.90


def _client(ca: CA | None, directory: Path) -> SecuritySettings:
    if ca is None:
        return SecuritySettings()
    me = issue(ca, "bench", directory)
    return SecuritySettings(tls_cert=me.cert, tls_key=me.key, tls_ca=ca.cert_path)


def _use(settings: SecuritySettings) -> None:
    """This process's new channels: plaintext or mutual TLS."""
    configure_clients(settings)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def data_path(plain_address: str, tls_address: str, plain: SecuritySettings, tls: SecuritySettings,
                    rounds: int, count: int, pids: dict[str, int]) -> dict[str, list[float]]:
    """GB/s per round for put and get, and CPU seconds per GB moved (server + client), plaintext
    and TLS, alternating."""
    _use(plain)
    plain_system = GrpcSystem("plaintext", plain_address, CHUNK, pids["plaintext"])
    _use(tls)
    tls_system = GrpcSystem("mtls", tls_address, CHUNK, pids["mtls"])
    out: dict[str, list[float]] = {f"{s} {op}": [] for s in ("plaintext", "mtls") for op in ("put", "get", "cpu")}
    try:
        for system in (plain_system, tls_system):  # warm-up: connect, fill the keys gets read
            put, _ = system.ops(VALUE, 1)
            await drive(put, 64, IN_FLIGHT)
        for _ in range(rounds):
            for system in (plain_system, tls_system):
                put, get = system.ops(VALUE, 1)
                cpu = cpu_seconds(pids[system.name]) + time.process_time()
                seconds, _ = await drive(put, count, IN_FLIGHT)
                out[f"{system.name} put"].append(count * VALUE / seconds / 1e9)
                seconds, _ = await drive(get, count, IN_FLIGHT)
                out[f"{system.name} get"].append(count * VALUE / seconds / 1e9)
                cpu = cpu_seconds(pids[system.name]) + time.process_time() - cpu
                out[f"{system.name} cpu"].append(cpu / (2 * count * VALUE / 1e9))
    finally:
        await plain_system.close()
        await tls_system.close()
    return out


async def route(ca: CA, directory: Path, plain: SecuritySettings, tls: SecuritySettings, rounds: int,
                seconds: float, conc: int) -> tuple[list[float], list[float], list[float], list[float]]:
    """Route req/s and CPU µs per request (server and client share this process) per round,
    plaintext and TLS, alternating."""
    blocks = 100_000
    core = make_core(blocks)
    work = Workload.make(seed=3)
    fill(core, work, blocks)
    hasher = core.hasher("m")
    requests = [router_pb2.RouteRequest(request_id=f"g{i}", model="m",
                                        blocks=router_pb2.BlockIds(ids=hasher.token_block_ids(work.next_prompt())))
                for i in range(2000)]
    server = issue(ca, "router", directory)
    plain_rt = ServerRuntime(BenchService(RouterApi(core)),
                             RouterSettings(listen="127.0.0.1:0", grace_seconds=0.5))
    tls_rt = ServerRuntime(BenchService(RouterApi(core)),
                           RouterSettings(listen="127.0.0.1:0", grace_seconds=0.5, tls_cert=server.cert,
                                          tls_key=server.key, tls_ca=ca.cert_path))
    plain_address, tls_address = await plain_rt.start(), await tls_rt.start()
    plain_rates: list[float] = []
    tls_rates: list[float] = []
    plain_cpu: list[float] = []
    tls_cpu: list[float] = []
    try:
        for _ in range(rounds):
            for settings, address, rates, cpus in ((plain, plain_address, plain_rates, plain_cpu),
                                                   (tls, tls_address, tls_rates, tls_cpu)):
                _use(settings)
                cpu, start = time.process_time(), time.perf_counter()
                rate = await unary_throughput(address, requests, seconds, conc)
                cpu, elapsed = time.process_time() - cpu, time.perf_counter() - start
                rates.append(rate)
                cpus.append(cpu / (rate * elapsed) * 1e6)
    finally:
        await plain_rt.stop()
        await tls_rt.stop()
    return plain_rates, tls_rates, plain_cpu, tls_cpu


def _ratio(tls: list[float], plain: list[float]) -> float:
    return statistics.median(t / p for t, p in zip(tls, plain, strict=True))


def _row(name: str, plain: str, tls: str, ratio: float, target: float) -> None:
    verdict = "ok" if ratio >= target else "MISSED"
    print(f"  {name:<24} {plain:>14} {tls:>14} {ratio:>8.2f}   >= {target:.2f}  {verdict}")


async def measure(quick: bool, directory: Path, ca: CA, plain_address: str, tls_address: str,
                  pids: dict[str, int]) -> None:
    rounds = 3 if quick else 5
    plain, tls = _client(None, directory), _client(ca, directory)
    count = 32 if quick else 96
    data = await data_path(plain_address, tls_address, plain, tls, rounds, count, pids)
    plain_rates, tls_rates, plain_cpu, tls_cpu = await route(ca, directory, plain, tls, rounds,
                                                             1.0 if quick else 2.0, 64)
    print(f"\nmutual TLS (ECDSA P-256, TLS 1.3) vs plaintext; {rounds} alternating rounds; medians")
    print(f"  {'':<24} {'plaintext':>14} {'mTLS':>14} {'ratio':>8}   target")
    for op in ("put", "get"):
        p, t = data[f"plaintext {op}"], data[f"mtls {op}"]
        _row(f"data path {op} {format_size(VALUE)}", f"{statistics.median(p):.2f} GB/s",
             f"{statistics.median(t):.2f} GB/s", _ratio(t, p), TARGET_DATA)
    _row("Route (unary, 64 conc.)", f"{statistics.median(plain_rates):,.0f} req/s",
         f"{statistics.median(tls_rates):,.0f} req/s", _ratio(tls_rates, plain_rates), TARGET_ROUTE)
    print("  CPU cost (ratio = plaintext CPU / mTLS CPU: the throughput ratio where CPU-bound)")
    p, t = data["plaintext cpu"], data["mtls cpu"]
    _row(f"data path CPU {format_size(VALUE)}", f"{statistics.median(p):.2f} s/GB", f"{statistics.median(t):.2f} s/GB",
         _ratio(p, t), TARGET_DATA)
    _row("Route CPU", f"{statistics.median(plain_cpu):,.0f} us/req", f"{statistics.median(tls_cpu):,.0f} us/req",
         _ratio(plain_cpu, tls_cpu), TARGET_ROUTE)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 shorter rounds instead of 5")
    args = parser.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-security-") as tmp:
        directory = Path(tmp)
        ca = make_ca(directory, "bench CA")
        node_cert = issue(ca, "cachenode-0", directory)
        common = ["cachenode", "--standalone", "--listen", "127.0.0.1:0", "--storage", "memory://?capacity=1GiB",
                  "--chunk-bytes", str(CHUNK), "--log-level", "warning"]
        plain_node = KvmeshProcess(common, name="cachenode-plaintext")
        tls_node = KvmeshProcess([*common, *tls_flags(ca, node_cert)], name="cachenode-mtls")
        try:
            plain_address, tls_address = plain_node.wait_ready(60), tls_node.wait_ready(60)
            pids = {"plaintext": plain_node.pid, "mtls": tls_node.pid}
            uvloop.run(measure(args.quick, directory, ca, plain_address, tls_address, pids))
        finally:
            plain_node.terminate()
            tls_node.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
