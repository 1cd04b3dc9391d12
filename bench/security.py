"""The cost of security: `Route` throughput and the cache node's data paths, with and without it.

    .venv/bin/python -m bench.security            # 5 rounds
    .venv/bin/python -m bench.security --quick    # 3 shorter rounds
    .venv/bin/python -m bench.security --quick --data-only   # the bulk data plane only

Data paths: two real `kvmesh cachenode` processes (memory storage), one plaintext, one secured as
`kvmesh up` runs it (mutual TLS with a CA made for the run, and a policy: every call authenticated
and checked against the client's namespace grant). Each is driven through the bulk data plane
(`batch_put_from`/`batch_get_into`, the client library's fast path) and through gRPC
(BatchPut/BatchGet), with 2 MiB values and 16 operations in flight. Route: two in-process routers
over one filled prefix tree (100,000 blocks, 64 pods), plaintext and mutual TLS, 64 concurrent
unary calls. Rounds alternate between plaintext and secured (the machine's background load
drifts; alternating keeps the comparison fair); the ratio is the median of each round's
secured/plaintext ratio. Targets (issue 12): at most 15% less throughput with mTLS on the data
plane at 2 MiB values, at most 10% less on `Route`.

On a shared, oversubscribed machine wall-clock throughput is mostly noise, so the CPU time each
side spent (server process + client, from /proc and `time.process_time`) per GB or per request is
printed too: on a machine where these paths are CPU-bound, plaintext CPU / mTLS CPU is the
throughput ratio to expect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench.cachenode import DataPlaneSystem, GrpcSystem, System, drive, openssl_aes_gcm
from bench.router import BenchService, Workload, fill, make_core, unary_throughput
from kvmesh.client.cache import CacheClient, NodeInfo
from kvmesh.runtime.server import ServerRuntime
from kvmesh.security.client import configure_clients
from kvmesh.security.settings import SecuritySettings
from kvmesh.security.tls import ClientTLS, TLSFiles
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


async def data_path(systems: dict[str, System], rounds: int, count: int,
                    pids: dict[str, int]) -> dict[str, list[float]]:
    """GB/s per round for put and get, and CPU seconds per GB moved (server + client), for each
    system, alternating plaintext and secured within each round."""
    out: dict[str, list[float]] = {f"{name} {op}": [] for name in systems for op in ("put", "get", "cpu")}
    for system in systems.values():  # warm-up: connect, fill the keys gets read
        put, _ = system.ops(VALUE, 1)
        await drive(put, 64, IN_FLIGHT)
    for _ in range(rounds):
        for name, system in systems.items():
            put, get = system.ops(VALUE, 1)
            pid = pids[name.split()[-1]]
            cpu = cpu_seconds(pid) + time.process_time()
            seconds, _ = await drive(put, count, IN_FLIGHT)
            out[f"{name} put"].append(count * VALUE / seconds / 1e9)
            seconds, _ = await drive(get, count, IN_FLIGHT)
            out[f"{name} get"].append(count * VALUE / seconds / 1e9)
            cpu = cpu_seconds(pid) + time.process_time() - cpu
            out[f"{name} cpu"].append(cpu / (2 * count * VALUE / 1e9))
    return out


async def open_systems(nodes: dict[str, tuple[str, str]], plain: SecuritySettings,
                       tls: SecuritySettings, pids: dict[str, int], data_only: bool = False) -> dict[str, System]:
    """The four ways in: data plane and gRPC, to the plaintext and to the secured node."""
    files = TLSFiles(tls_cert=tls.tls_cert, tls_key=tls.tls_key, tls_ca=tls.tls_ca)
    systems: dict[str, System] = {}
    for kind, settings in (("plaintext", plain), ("mtls", tls)):
        address, endpoint = nodes[kind]
        info = [NodeInfo("node", address, data_endpoint=endpoint)]
        client_tls = ClientTLS(files) if kind == "mtls" else None
        client = await CacheClient.from_nodes(info, local="never", tls=client_tls)
        systems[f"data plane {kind}"] = DataPlaneSystem(kind, client, pids[kind])
        if data_only:
            continue
        _use(settings)  # gRPC channels take this process's client settings
        systems[f"gRPC {kind}"] = GrpcSystem(kind, address, CHUNK, pids[kind])
    return systems


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


async def measure(quick: bool, directory: Path, ca: CA, nodes: dict[str, tuple[str, str]],
                  pids: dict[str, int], data_only: bool = False) -> None:
    rounds = 3 if quick else 5
    plain, tls = _client(None, directory), _client(ca, directory)
    count = 32 if quick else 96
    systems = await open_systems(nodes, plain, tls, pids, data_only)
    try:
        data = await data_path(systems, rounds, count, pids)
    finally:
        for system in systems.values():
            await system.close()
    plain_rates, tls_rates, plain_cpu, tls_cpu = ([1.0], [1.0], [1.0], [1.0]) if data_only else await route(
        ca, directory, plain, tls, rounds, 1.0 if quick else 2.0, 64)
    paths = ("data plane",) if data_only else ("data plane", "gRPC")
    print(f"\nsecured (mutual TLS, ECDSA P-256, TLS 1.3; the cache node also with a policy) vs plaintext; "
          f"{rounds} alternating rounds; medians")
    print(f"  {'':<28} {'plaintext':>14} {'secured':>14} {'ratio':>8}   target")
    for path in paths:
        for op in ("put", "get"):
            p, t = data[f"{path} plaintext {op}"], data[f"{path} mtls {op}"]
            _row(f"{path} {op} {format_size(VALUE)}", f"{statistics.median(p):.2f} GB/s",
                 f"{statistics.median(t):.2f} GB/s", _ratio(t, p), TARGET_DATA)
    if not data_only:
        _row("Route (unary, 64 conc.)", f"{statistics.median(plain_rates):,.0f} req/s",
             f"{statistics.median(tls_rates):,.0f} req/s", _ratio(tls_rates, plain_rates), TARGET_ROUTE)
    print("  CPU cost (ratio = plaintext CPU / secured CPU: the throughput ratio where CPU-bound)")
    for path in paths:
        p, t = data[f"{path} plaintext cpu"], data[f"{path} mtls cpu"]
        _row(f"{path} CPU {format_size(VALUE)}", f"{statistics.median(p):.2f} s/GB",
             f"{statistics.median(t):.2f} s/GB", _ratio(p, t), TARGET_DATA)
    if not data_only:
        _row("Route CPU", f"{statistics.median(plain_cpu):,.0f} us/req",
             f"{statistics.median(tls_cpu):,.0f} us/req", _ratio(plain_cpu, tls_cpu), TARGET_ROUTE)
    # The physical limit where the path is CPU-bound (loopback on few cores): every byte is
    # encrypted once and decrypted once, at the rate one core runs AES-GCM.
    aes, why = openssl_aes_gcm()
    if aes == aes:  # not NaN
        plain_cpu_gb = statistics.median(data["data plane plaintext cpu"])
        bound = plain_cpu_gb / (plain_cpu_gb + 2 / aes)
        print(f"  physical limit here: AES-256-GCM {aes:.2f} GB/s per core (openssl speed), so a CPU-bound "
              f"data plane at {plain_cpu_gb:.2f} s/GB can reach at most {bound:.2f} of plaintext with TLS")
    else:
        print(f"  physical limit: not measured ({why})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 shorter rounds instead of 5")
    parser.add_argument("--data-only", action="store_true", help="only the bulk data plane (no gRPC, no Route)")
    args = parser.parse_args(argv)
    import uvloop

    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-security-") as tmp:
        directory = Path(tmp)
        ca = make_ca(directory, "bench CA")
        node_cert = issue(ca, "cachenode-0", directory)
        common = ["cachenode", "--standalone", "--listen", "127.0.0.1:0", "--storage", "memory://?capacity=1GiB",
                  "--chunk-bytes", str(CHUNK), "--log-level", "warning"]
        policy = directory / "policy.json"
        policy.write_text(json.dumps({"principals": {"bench": {"namespaces": {"read": ["*"], "write": ["*"]}}}}))
        plain_node = KvmeshProcess(common, name="cachenode-plaintext")
        tls_node = KvmeshProcess([*common, *tls_flags(ca, node_cert), "--security-policy", str(policy)],
                                 name="cachenode-mtls")
        try:
            plain_address, tls_address = plain_node.wait_ready(60), tls_node.wait_ready(60)
            nodes = {"plaintext": (plain_address, plain_node.ready["data_endpoint"]),
                     "mtls": (tls_address, tls_node.ready["data_endpoint"])}
            pids = {"plaintext": plain_node.pid, "mtls": tls_node.pid}
            uvloop.run(measure(args.quick, directory, ca, nodes, pids, args.data_only))
        finally:
            plain_node.terminate()
            tls_node.terminate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
