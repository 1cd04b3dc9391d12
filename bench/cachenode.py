"""Remote cache-node throughput, latency and CPU: the data plane vs gRPC, Redis, Mooncake and iperf3, in one run.

    .venv/bin/python -m bench.cachenode [--quick] [--chunk-bytes 4MiB] [--sizes 64KiB,2MiB,8MiB]

For values of 64 KiB, 2 MiB (one 16-token block of Llama-3-8B) and 8 MiB, in batches of 1
and 32 (16 and 2 batches in flight), put and get through, interleaved round by round:
  dp       a real `kvmesh cachenode` process (memory storage) through the client library's
           bulk data plane: `batch_put_from` / `batch_get_into` (docs/dataplane.md)
  dp-tls   the same over TLS (a second node with a certificate from a CA made here)
  grpc     the same node through BatchPut/BatchGet streams, as the client library calls them
  redis    redis-server through redis-py + hiredis (asyncio, one pool; batches pipelined: a
           pipeline of SETs, one MGET)
  noop     a grpc.aio server of the cache node's shape that stores nothing (gRPC's ceiling)
and as references, measured once: `redis-benchmark` (C, -P batch), Mooncake's transfer
engine over TCP (bench/mooncake_tcp.py inside `unshare -n`), and `iperf3 -l 1M` on loopback
in both directions (the physical limit). Reports GB/s (median of rounds), p50/p99 per
operation (a batch is one operation), and the server's CPU milliseconds per MiB moved (from
/proc/<pid>/stat), then every ratio next to its target.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from kvmesh import wire
from kvmesh.client.cache import CacheClient, NodeInfo
from kvmesh.runtime.channels import channel_options, open_channel
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.services.cachenode.kvcache_methods import add_kvcache_to_server
from kvmesh.tools.processes import KvmeshProcess, kvmesh_env
from kvmesh.tools.testing.certs import make_tls_files
from kvmesh.tools.testing.ports import free_port, wait_port
from kvmesh.tools.testing.servers import start_redis
from kvmesh.units import format_size, parse_size
from kvmesh.v1 import cachenode_pb2 as pb
from kvmesh.v1 import cachenode_pb2_grpc

SIZES = [64 * 1024, 2 * 1024**2, 8 * 1024**2]
BATCHES = [1, 32]
IN_FLIGHT = {1: 16, 32: 2}  # operations in flight per batch size
ROOT = Path(__file__).resolve().parents[1]
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MiB = 1024**2


@dataclass
class Result:
    system: str
    op: str
    size: int
    batch: int
    gbps: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_mib: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def ops_per_round(size: int, batch: int, quick: bool) -> int:
    total = (64 if quick else 256) * MiB  # bytes moved per system, op, size, batch and round
    return max(IN_FLIGHT[batch], total // (size * batch))


Op = Callable[[int], Awaitable[None]]


async def drive(op: Op, count: int, in_flight: int) -> tuple[float, list[float]]:
    """Runs `count` operations with `in_flight` at a time; returns (seconds, latencies)."""
    latencies: list[float] = []
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            i = next_index
            next_index += 1
            t0 = time.perf_counter()
            await op(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return time.perf_counter() - start, latencies


def batch_keys(size: int, batch: int, i: int) -> list[bytes]:
    """Keys of operation i: each operation in flight has its own (the noop server reads the size back)."""
    slot = i % IN_FLIGHT[batch]
    return [f"{size}-{batch}-{slot * batch + j}".encode() for j in range(batch)]


class System:
    """One system under test: put/get operations for a value size and batch."""

    name = ""
    pid = 0  # the server process whose CPU is counted

    def ops(self, size: int, batch: int) -> tuple[Op, Op]:
        raise NotImplementedError

    async def run(self, op: str, size: int, batch: int, count: int, in_flight: int) -> tuple[float, list[float]]:
        """`count` puts or gets with `in_flight` at a time: (seconds, latencies)."""
        cached: dict[tuple[int, int], tuple[Op, Op]] = self.__dict__.setdefault("_ops", {})
        if (size, batch) not in cached:
            cached[(size, batch)] = self.ops(size, batch)
        gc.collect()  # each round starts from a clean heap
        return await drive(cached[(size, batch)][0 if op == "put" else 1], count, in_flight)

    async def close(self) -> None:
        """Releases connections."""


class ClientProcess(System):
    """A system driven from its own client process, so no system's threads or garbage slow another's.

    The child (`--serve-client SPEC`) builds the system from SPEC and runs each round the parent
    asks for, one JSON line each way.
    """

    def __init__(self, name: str, pid: int, spec: dict[str, Any], process: asyncio.subprocess.Process) -> None:
        self.name = name
        self.pid = pid
        self.spec = spec
        self.process = process

    @classmethod
    async def start(cls, name: str, pid: int, spec: dict[str, Any]) -> ClientProcess:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.cachenode", "--serve-client", json.dumps({"name": name, **spec}),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=kvmesh_env(), cwd=ROOT,
            limit=1 << 26,
        )
        return cls(name, pid, spec, process)

    async def run(self, op: str, size: int, batch: int, count: int, in_flight: int) -> tuple[float, list[float]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        command = {"op": op, "size": size, "batch": batch, "count": count, "in_flight": in_flight}
        self.process.stdin.write(json.dumps(command).encode() + b"\n")
        await self.process.stdin.drain()
        line = await self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.name} client process died (exit {await self.process.wait()})")
        answer = json.loads(line)
        return float(answer["seconds"]), [float(x) for x in answer["latencies"]]

    async def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()


async def build_system(spec: dict[str, Any]) -> System:
    """The system a client process drives (see `ClientProcess`)."""
    kind, name = spec["kind"], spec["name"]
    if kind == "dp":
        node = NodeInfo("node", spec["address"], data_endpoint=spec["data_endpoint"])
        tls = ClientTLS(TLSFiles(tls_ca=spec["ca"])) if spec.get("ca") else None
        return DataPlaneSystem(name, await CacheClient.from_nodes([node], local="never", tls=tls), 0)
    if kind == "grpc":
        return GrpcSystem(name, spec["address"], spec["chunk"], 0)
    if kind == "redis":
        return RedisSystem(spec["port"], 0)
    raise ValueError(f"unknown system kind {kind!r}")


async def serve_client(spec: dict[str, Any]) -> None:
    """The child side of `ClientProcess`: one round per line on stdin, its result on stdout."""
    system = await build_system(spec)
    loop = asyncio.get_running_loop()
    try:
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = json.loads(line)
            seconds, latencies = await system.run(
                command["op"], command["size"], command["batch"], command["count"], command["in_flight"]
            )
            print(json.dumps({"seconds": seconds, "latencies": latencies}), flush=True)
    finally:
        await system.close()


class DataPlaneSystem(System):
    """The client library over the node's data plane: values sent from and received into buffers."""

    def __init__(self, name: str, client: CacheClient, pid: int) -> None:
        self.name = name
        self.client = client
        self.pid = pid

    def ops(self, size: int, batch: int) -> tuple[Op, Op]:
        value = memoryview(os.urandom(size))
        sources = [value] * batch
        sinks = [bytearray(size) for _ in range(batch)]  # shared by the operations in flight

        async def put(i: int) -> None:
            stored = await self.client.batch_put_from(batch_keys(size, batch, i), sources)
            assert all(stored), stored

        async def get(i: int) -> None:
            sizes = await self.client.batch_get_into(batch_keys(size, batch, i), sinks)
            assert sizes == [size] * batch, sizes

        return put, get

    async def close(self) -> None:
        await self.client.close()


class GrpcSystem(System):
    """The cache node or the no-op server, called exactly as the client library calls them."""

    def __init__(self, name: str, address: str, chunk: int, pid: int) -> None:
        self.name = name
        self.chunk = chunk
        self.pid = pid
        self.channel = open_channel(address)
        # Hand-coded value messages (kvmesh.wire), as in kvmesh.client.
        self.batch_put = self.channel.stream_unary(
            "/kvmesh.v1.KVCache/BatchPut",
            request_serializer=wire.identity,
            response_deserializer=pb.BatchPutResponse.FromString,
        )
        self.batch_get = self.channel.unary_stream(
            "/kvmesh.v1.KVCache/BatchGet",
            request_serializer=pb.BatchGetRequest.SerializeToString,
            response_deserializer=wire.decode_get_chunk,
        )

    def ops(self, size: int, batch: int) -> tuple[Op, Op]:
        value = memoryview(os.urandom(size))
        chunk = self.chunk

        async def put(i: int) -> None:
            keys = batch_keys(size, batch, i)

            async def chunks() -> AsyncIterator[bytes]:
                for key in keys:
                    for offset in range(0, size, chunk):
                        yield wire.encode_put_chunk("", key, size, offset, value[offset : offset + chunk])

            resp = await self.batch_put(chunks())
            assert resp.stored == batch, resp

        async def get(i: int) -> None:
            got = 0
            async for c in self.batch_get(pb.BatchGetRequest(namespace="", keys=batch_keys(size, batch, i))):
                got += len(c.data)
            assert got == size * batch, (got, size)

        return put, get

    async def close(self) -> None:
        await self.channel.close()


class RedisSystem(System):
    """redis-server through redis-py's asyncio client (hiredis parser), one pool, batches pipelined."""

    name = "redis"

    def __init__(self, port: int, pid: int) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis(host="127.0.0.1", port=port, max_connections=64, socket_timeout=600)
        self.pid = pid

    def ops(self, size: int, batch: int) -> tuple[Op, Op]:
        value = os.urandom(size)

        async def put(i: int) -> None:
            keys = batch_keys(size, batch, i)
            if batch == 1:
                await self.client.set(keys[0], value)
                return
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(key, value)
                await pipe.execute()

        async def get(i: int) -> None:
            keys = batch_keys(size, batch, i)
            got = [await self.client.get(keys[0])] if batch == 1 else await self.client.mget(keys)
            assert all(v is not None and len(v) == size for v in got)

        return put, get

    async def close(self) -> None:
        await self.client.aclose()


async def compare(systems: list[System], sizes: list[int], quick: bool, between: Callable[[], None]) -> list[Result]:
    """Interleaves the systems round by round (rotating who goes first), so load changes on a
    shared machine hit all of them alike; GB/s is the median of the rounds. `between` runs
    before each size (the iperf3 samples, spread over the run the same way)."""
    rounds = 3 if quick else 5
    out: list[Result] = []
    for size in sizes:
        between()
        for batch in BATCHES:
            in_flight = IN_FLIGHT[batch]
            count = ops_per_round(size, batch, quick)
            for system in systems:  # warm-up, and the keys the gets read
                await system.run("put", size, batch, in_flight * 2, in_flight)
                await system.run("get", size, batch, in_flight, in_flight)
            for op in ("put", "get"):
                rates: dict[str, list[float]] = {s.name: [] for s in systems}
                latencies: dict[str, list[float]] = {s.name: [] for s in systems}
                cpu: dict[str, float] = {s.name: 0.0 for s in systems}
                for r in range(rounds):
                    for system in systems[r % len(systems) :] + systems[: r % len(systems)]:
                        cpu0 = cpu_seconds(system.pid)
                        seconds, lat = await system.run(op, size, batch, count, in_flight)
                        cpu[system.name] += cpu_seconds(system.pid) - cpu0
                        rates[system.name].append(count * size * batch / seconds / 1e9)
                        latencies[system.name] += lat
                moved_mib = rounds * count * size * batch / MiB
                for system in systems:
                    lat = sorted(latencies[system.name])
                    p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                    gbps = statistics.median(rates[system.name])
                    result = Result(
                        system.name,
                        op,
                        size,
                        batch,
                        gbps,
                        statistics.median(lat) * 1e3,
                        p99 * 1e3,
                        cpu[system.name] * 1e3 / moved_mib,
                    )
                    out.append(result)
                    print(f"  {format_row(result)}", flush=True)
    return out


# -- references ------------------------------------------------------------------------


class Iperf:
    """`iperf3 -l 1M` on loopback, both directions, sampled between sizes."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.samples: dict[str, list[float]] = {"put": [], "get": []}  # client→server, server→client
        self.cpu: dict[str, list[float]] = {"put": [], "get": []}  # the server's CPU ms per MiB
        self.why = "" if shutil.which("iperf3") else "iperf3 is not installed (scripts/bootstrap.sh installs it)"
        self.installed = not self.why

    def sample(self) -> None:
        """One measurement per direction (a failed one is reported and skipped)."""
        if shutil.which("iperf3") is None:
            return
        port = free_port()
        server = subprocess.Popen(
            ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            for op, extra in (("put", []), ("get", ["-R"])):
                for attempt in range(20):  # no probe connection: iperf3's server takes one client at a time
                    try:
                        run = subprocess.run(
                            ["iperf3", "-c", "127.0.0.1", "-p", str(port), "-l", "1M", "-t", str(self.seconds),
                             "-J", *extra],
                            capture_output=True, text=True, timeout=60,
                        )
                        end = json.loads(run.stdout)["end"]
                        moved = end["sum_received"]["bytes"]
                        seconds = end["sum_received"]["seconds"]
                        server_cpu = end["cpu_utilization_percent"]["remote_total"] / 100 * seconds
                    except (OSError, ValueError, KeyError, subprocess.SubprocessError) as exc:
                        self.why = f"iperf3 failed once: {exc!r}"
                        time.sleep(0.1 * (attempt + 1))
                        continue
                    self.samples[op].append(moved / seconds / 1e9)
                    # The iperf3 server's CPU per MiB: what the kernel's loopback copies cost one side.
                    self.cpu[op].append(server_cpu * 1e3 / (moved / MiB))
                    break
        finally:
            server.terminate()
            server.wait(10)

    def gbps(self, op: str) -> float:
        return statistics.median(self.samples[op]) if self.samples[op] else float("nan")


def redis_benchmark(port: int, sizes: list[int], quick: bool) -> tuple[dict[tuple[str, int, int], float], str]:
    """redis-benchmark (C) GB/s per (op, size, batch): same value sizes, -P batch pipelining."""
    if shutil.which("redis-benchmark") is None:
        return {}, "redis-benchmark is not installed"
    out: dict[tuple[str, int, int], float] = {}
    for size in sizes:
        for batch in BATCHES:
            requests = max(64, (64 if quick else 256) * MiB // size)
            clients = IN_FLIGHT[batch]
            run = subprocess.run(
                [
                    "redis-benchmark",
                    "-p",
                    str(port),
                    "-t",
                    "set,get",
                    "-d",
                    str(size),
                    "-n",
                    str(requests),
                    "-c",
                    str(clients),
                    "-P",
                    str(batch),
                    "-r",
                    "64",
                    "-q",
                    "--csv",
                ],
                capture_output=True,
                text=True,
                timeout=300,
            )
            for line in run.stdout.splitlines():
                cells = [c.strip('"') for c in line.split(",")]
                if len(cells) >= 2 and cells[0] in ("SET", "GET"):
                    op = "put" if cells[0] == "SET" else "get"
                    out[(op, size, batch)] = float(cells[1]) * size / 1e9
    return out, ""


def openssl_aes_gcm() -> tuple[float, str]:
    """`openssl speed` AES-256-GCM at 16 KiB records, one core: the TLS ceiling of this machine now."""
    if shutil.which("openssl") is None:
        return float("nan"), "openssl is not installed"
    run = subprocess.run(
        ["openssl", "speed", "-elapsed", "-seconds", "2", "-evp", "aes-256-gcm"],
        capture_output=True, text=True, timeout=120,
    )
    for line in run.stdout.splitlines():
        if line.startswith("AES-256-GCM"):
            return float(line.split()[-1].rstrip("k")) * 1e3 / 1e9, ""
    return float("nan"), f"no figure in its output (exit {run.returncode})"


def mooncake(sizes: list[int], quick: bool) -> tuple[dict[tuple[str, int, int], float], str]:
    """Mooncake's transfer engine over TCP, raw, inside a private network namespace."""
    if shutil.which("unshare") is None:
        return {}, "unshare is not available"
    inner = (
        f"ip link set lo up && exec {sys.executable} -m bench.mooncake_tcp --sizes {','.join(map(str, sizes))} "
        f"--batches {','.join(map(str, BATCHES))} --rounds {3 if quick else 5} --bytes-per-round {64 * MiB}"
    )
    try:
        run = subprocess.run(
            ["unshare", "-n", "sh", "-c", inner],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=ROOT,
            env=kvmesh_env({"MC_TCP_BIND_ADDRESS": "127.0.0.1"}),
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return {}, f"cannot run it: {exc}"
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if run.returncode != 0 or not lines:
        return {}, f"it failed (exit {run.returncode}): {(run.stderr or run.stdout).strip()[-300:]}"
    out = {}
    for key, gbps in json.loads(lines[-1]).items():
        size, batch, op = key.split(",")
        out[(op, int(size), int(batch))] = float(gbps)
    return out, ""


# -- the no-op gRPC server -------------------------------------------------------------


class NoopServicer(cachenode_pb2_grpc.KVCacheServicer):
    """Same RPCs and message shapes as the cache node, storing nothing."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.blobs = {size: memoryview(os.urandom(size)) for size in SIZES}

    async def BatchPut(self, request_iterator, context):
        keys = set()
        async for c in request_iterator:
            keys.add(c.key)
        return pb.BatchPutResponse(stored=len(keys))

    async def BatchGet(self, request, context):
        for index, key in enumerate(request.keys):
            size = int(key.split(b"-")[0])
            blob = self.blobs[size]
            for offset in range(0, size, self.chunk):
                yield wire.encode_get_chunk(index, key, True, size, offset, blob[offset : offset + self.chunk])


async def serve_noop(port: int, chunk: int) -> None:
    server = grpc.aio.server(options=channel_options())
    # The same method table (and message codecs) as the cache node.
    add_kvcache_to_server(NoopServicer(chunk), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("NOOP_READY", flush=True)
    await server.wait_for_termination()


# -- report ----------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    head = f"{'system':8} {'op':4} {'size':>9} {'batch':>5} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8}"
    print(f"\n{head} {'node CPU ms/MiB':>16}")
    for r in sorted(results, key=lambda r: (r.size, r.batch, r.op, r.system)):
        print(format_row(r))


def format_row(r: Result) -> str:
    return (
        f"{r.system:8} {r.op:4} {format_size(r.size):>9} {r.batch:>5} {r.gbps:7.2f} {r.p50_ms:8.2f} "
        f"{r.p99_ms:8.2f} {r.cpu_ms_per_mib:16.3f}"
    )


def print_references(
    sizes: list[int],
    iperf: Iperf,
    rb: dict[tuple[str, int, int], float],
    rb_why: str,
    mc: dict[tuple[str, int, int], float],
    mc_why: str,
) -> None:
    print("\nreferences (GB/s)")
    if not iperf.samples["put"] or not iperf.samples["get"]:
        print(f"  iperf3: not measured: {iperf.why}")
    else:
        cpu = {op: statistics.median(iperf.cpu[op]) for op in ("put", "get")}
        each = {op: ", ".join(f"{g:.2f}" for g in iperf.samples[op]) for op in ("put", "get")}
        print(
            f"  iperf3 -l 1M loopback: client->server {iperf.gbps('put'):.2f}, server->client {iperf.gbps('get'):.2f}"
            f" (medians of samples {each['put']} / {each['get']});"
            f" iperf3 server CPU ms/MiB {cpu['put']:.3f} receiving, {cpu['get']:.3f} sending"
            f" (the kernel's share of any TCP transfer)"
        )
        if iperf.why:
            print(f"  ({iperf.why})")
    if rb_why:
        print(f"  redis-benchmark: not measured: {rb_why}")
    if mc_why:
        print(f"  mooncake TCP: not measured: {mc_why}")
    print(f"  {'size':>9} {'batch':>5}  {'redis-benchmark set/get':>24}  {'mooncake tcp write/read':>24}")
    def pair(d: dict[tuple[str, int, int], float], size: int, batch: int) -> str:
        put, get = d.get(("put", size, batch)), d.get(("get", size, batch))
        return "-" if put is None or get is None else f"{put:.2f} / {get:.2f}"

    for size in sizes:
        for batch in BATCHES:
            print(f"  {format_size(size):>9} {batch:>5}  {pair(rb, size, batch):>24}  {pair(mc, size, batch):>24}")


def print_targets(results: list[Result], sizes: list[int], iperf: Iperf) -> bool:
    by = {(r.system, r.op, r.size, r.batch): r for r in results}
    rows: list[tuple[str, float, float]] = []
    for size in sizes:
        for batch in BATCHES:
            for op, goal in (("get", 2.0), ("put", 1.0)):
                ratio = by[("dp", op, size, batch)].gbps / by[("redis", op, size, batch)].gbps
                rows.append((f"{format_size(size)} x{batch} {op}: dp / redis-py >= {goal:.0f}x", ratio, goal))
    for size in (s for s in sizes if s >= 2 * MiB):
        for op in ("put", "get"):
            ratio = by[("dp", op, size, 32)].gbps / iperf.gbps(op)
            rows.append((f"{format_size(size)} x32 {op}: dp / iperf3 -l 1M >= 70%", ratio, 0.70))
    for size in sizes:
        for batch in BATCHES:
            for op in ("put", "get"):
                cpu = by[("dp", op, size, batch)].cpu_ms_per_mib
                rows.append((f"{format_size(size)} x{batch} {op}: node CPU ms/MiB <= 0.3", cpu, -0.3))
    two = 2 * MiB if 2 * MiB in sizes else sizes[0]
    for op in ("put", "get"):  # the earlier figures: the gRPC path against the transport ceiling
        ratio = by[("grpc", op, two, 1)].gbps / by[("noop", op, two, 1)].gbps
        rows.append((f"{format_size(two)} x1 {op}: grpc / no-op gRPC (info)", ratio, 0.0))
        ratio = by[("dp-tls", op, two, 32)].gbps / by[("dp", op, two, 32)].gbps
        rows.append((f"{format_size(two)} x32 {op}: dp-tls / dp (info)", ratio, 0.0))
    print("\ntargets")
    missed = 0
    for name, value, goal in rows:
        if goal < 0:
            met = value <= -goal
        elif goal == 0:
            print(f"  {name:48} {value:7.2f}")
            continue
        else:
            met = value >= goal
        missed += not met
        print(f"  {name:48} {value:7.2f}  {'met' if met else 'MISSED'}")
    print(f"\n{sum(1 for *_, g in rows if g != 0) - missed} of {sum(1 for *_, g in rows if g != 0)} targets met")
    return missed == 0


# -- run -------------------------------------------------------------------------------


async def measure(
    node: KvmeshProcess,
    tls_node: KvmeshProcess,
    ca: Path,
    noop_address: str,
    noop_pid: int,
    redis_port: int,
    redis_pid: int,
    sizes: list[int],
    quick: bool,
    chunk: int,
    iperf: Iperf,
) -> list[Result]:
    print(
        f"values {', '.join(format_size(s) for s in sizes)}; batches {BATCHES}; in flight {IN_FLIGHT}; "
        f"gRPC chunk {format_size(chunk)}; {os.cpu_count()} CPUs"
    )
    assert node.address and tls_node.address
    # Each system runs in its own client process: in one shared process, gRPC's threads and
    # garbage from the gRPC rounds slowed the next rounds of every other system.
    systems: list[System] = [
        await ClientProcess.start("dp", node.pid, {"kind": "dp", "address": node.address,
                                                   "data_endpoint": node.ready["data_endpoint"]}),
        await ClientProcess.start("dp-tls", tls_node.pid, {"kind": "dp", "address": tls_node.address,
                                                           "data_endpoint": tls_node.ready["data_endpoint"],
                                                           "ca": str(ca)}),
        await ClientProcess.start("grpc", node.pid, {"kind": "grpc", "address": node.address, "chunk": chunk}),
        await ClientProcess.start("redis", redis_pid, {"kind": "redis", "port": redis_port}),
        await ClientProcess.start("noop", noop_pid, {"kind": "grpc", "address": noop_address, "chunk": chunk}),
    ]
    try:
        return await compare(systems, sizes, quick, iperf.sample)
    finally:
        for system in systems:
            await system.close()


def run(quick: bool, chunk: int, sizes: list[int]) -> bool:
    """Starts the servers as processes, measures, stops them."""
    import uvloop

    common = [
        "cachenode",
        "--standalone",
        "--listen",
        "127.0.0.1:0",
        "--storage",
        "memory://?capacity=2GiB",
        "--chunk-bytes",
        str(chunk),
        "--log-level",
        "warning",
    ]
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        files = make_tls_files(Path(tmp))
        node = KvmeshProcess(common, name="cachenode")
        tls_node = KvmeshProcess(
            [*common, "--tls-cert", str(files.cert), "--tls-key", str(files.key), "--tls-ca", str(files.ca),
             "--no-tls-require-client-cert"],
            name="cachenode-tls",
        )
        noop_port = free_port()
        noop = subprocess.Popen(
            [sys.executable, "-m", "bench.cachenode", "--serve-noop", str(noop_port), "--chunk-bytes", str(chunk)],
            env=kvmesh_env(),
            cwd=ROOT,
        )
        redis = start_redis(Path(tmp))
        iperf = Iperf(1.0 if quick else 2.0)
        try:
            node.wait_ready(30)
            tls_node.wait_ready(30)
            wait_port("127.0.0.1", noop_port, 30)
            assert redis.process is not None
            results = uvloop.run(
                measure(
                    node,
                    tls_node,
                    files.ca,
                    f"127.0.0.1:{noop_port}",
                    noop.pid,
                    redis.port,
                    redis.process.pid,
                    sizes,
                    quick,
                    chunk,
                    iperf,
                )
            )
            iperf.sample()
            rb, rb_why = redis_benchmark(redis.port, sizes, quick)
        finally:
            redis.stop()
            node.terminate()
            tls_node.terminate()
            noop.terminate()
            noop.wait(10)
    mc, mc_why = mooncake(sizes, quick)
    aes, aes_why = openssl_aes_gcm()
    print_table(results)
    print_references(sizes, iperf, rb, rb_why, mc, mc_why)
    print(f"  openssl speed aes-256-gcm (16 KiB, one core): {aes:.2f} GB/s {aes_why}".rstrip())
    return print_targets(results, sizes, iperf)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 MiB per case instead of 5 of 256 MiB")
    parser.add_argument("--chunk-bytes", default="4MiB", help="gRPC: data per stream message (both directions)")
    parser.add_argument("--sizes", default=",".join(format_size(s).replace(" ", "") for s in SIZES))
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-client", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunk = parse_size(args.chunk_bytes)
    import uvloop

    if args.serve_noop:
        uvloop.run(serve_noop(args.serve_noop, chunk))
        return 0
    if args.serve_client:
        uvloop.run(serve_client(json.loads(args.serve_client)))
        return 0
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    run(args.quick, chunk, sizes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
