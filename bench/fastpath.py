"""Fast data paths side by side: zero-copy shared memory, RDMA (Mooncake), gRPC, in-process copy.

    .venv/bin/python -m bench.fastpath            # local path vs gRPC vs numpy copy (+ GPU if present)
    .venv/bin/python -m bench.fastpath --rdma     # remote path over Mooncake vs gRPC (needs unshare -n)
    .venv/bin/python -m bench.fastpath --quick    # a short run

    .venv/bin/python -m bench.fastpath --write-rate ~/.cache/kvmesh/pool-rate.json   # feed the simulator

Each figure is the bandwidth of one client doing one call at a time against a cache node
running as a real `kvmesh cachenode` process. The local table moves values of 64 KiB, 2 MiB
and 8 MiB (and 1 MiB singly) in batches of 1 and 32 with `batch_put_from` / `batch_get_into`
(caller-owned numpy buffers, one memcpy per value), next to a cold memcpy of the same bytes;
cases run in interleaved rounds and figures are medians. Targets (issue 16): a batch of
32 x 2 MiB at >= 80% of the cold memcpy, a single 1 MiB put/get at >= 30%.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvmesh.client.local import LocalDataPath
from kvmesh.runtime.channels import open_channel
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.v1 import cachenode_pb2, cachenode_pb2_grpc

KiB = 1 << 10
MiB = 1 << 20
SIZES = (1 * MiB, 8 * MiB)  # the GPU and RDMA tables
LOCAL_CASES = ((64 * KiB, 1), (64 * KiB, 32), (1 * MiB, 1), (2 * MiB, 1), (2 * MiB, 32), (8 * MiB, 1), (8 * MiB, 32))
# Targets of the local path, as fractions of a cold memcpy of the same bytes (issue 16).
TARGETS = {(2 * MiB, 32): 0.80, (1 * MiB, 1): 0.30}
COLD_WORKING_SET = 512 * MiB  # larger than any last-level cache: copies run at memory speed


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


async def timed(op: Callable[[int], Awaitable[object]], size: int, seconds: float, min_iters: int = 5) -> float:
    """GB/s of `op` run back to back for about `seconds` (after two warm-up calls)."""
    for i in range(2):
        await op(i)
    n = 0
    start = time.perf_counter()
    while n < min_iters or time.perf_counter() - start < seconds:
        await op(n)
        n += 1
    return gbps(size * n, time.perf_counter() - start)


def memcpy_gbps(size: int, seconds: float, working_set: int = 0) -> float:
    """numpy copy of `size` bytes; with `working_set`, into a ring of destinations that large
    (larger than the last-level cache: the bytes land in memory, as a cache's values do)."""
    src = np.random.default_rng(0).integers(0, 255, size, dtype=np.uint8)
    ring = [np.ones_like(src) for _ in range(max(1, working_set // size))]
    for dst in ring:
        np.copyto(dst, src)
    n = 0
    start = time.perf_counter()
    while n < 5 or time.perf_counter() - start < seconds:
        np.copyto(ring[n % len(ring)], src)
        n += 1
    return gbps(size * n, time.perf_counter() - start)


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for row in [header, *rows]:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


async def grpc_ops(stub: cachenode_pb2_grpc.KVCacheStub, value: bytes, namespace: str) -> tuple[Callable, Callable]:
    async def put(i: int) -> None:
        await stub.Put(cachenode_pb2.PutRequest(namespace=namespace, key=b"grpc", value=value))

    async def get(i: int) -> None:
        response = await stub.Get(cachenode_pb2.GetRequest(namespace=namespace, key=b"grpc"))
        assert response.found and len(response.value) == len(value)

    return put, get


def size_name(size: int) -> str:
    return f"{size // MiB} MiB" if size >= MiB else f"{size // KiB} KiB"


@dataclass
class Samples:
    """Per-operation latencies of one case, over all rounds, and the GB/s of each round."""

    nbytes: int  # bytes moved by one operation
    latencies: list[float] = field(default_factory=list)
    rounds: list[float] = field(default_factory=list)

    def gbps(self) -> float:
        return statistics.median(self.rounds)

    def pct_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e3


async def run_round(op: Callable[[], Awaitable[object]], samples: Samples, seconds: float, min_ops: int) -> None:
    n, start = 0, time.perf_counter()
    while n < min_ops or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        await op()
        samples.latencies.append(time.perf_counter() - t0)
        n += 1
    samples.rounds.append(gbps(samples.nbytes * n, time.perf_counter() - start))


class ColdCopy:
    """A cold memcpy of one batch: sources and destinations rotate through rings larger than the
    last-level cache, so neither side is cached (as with a cache's values and an engine's blocks)."""

    def __init__(self, size: int, batch: int) -> None:
        per_ring = max(batch, COLD_WORKING_SET // size)
        self.src = [np.full(size, i % 251, dtype=np.uint8) for i in range(per_ring)]
        self.dst = [np.ones(size, dtype=np.uint8) for _ in range(per_ring)]
        self.batch = batch
        self.next = 0

    async def op(self) -> None:
        n = len(self.src)
        for _ in range(self.batch):
            i = self.next
            self.next = (i + 1) % n
            np.copyto(self.dst[i], self.src[(i * 7 + 3) % n])


async def bench_local(seconds: float, rounds: int, write_rate: Path | None, grpc_rate: bool) -> None:
    # A long-lived node and client, as in serving: the node's pages are allocated at start
    # (prefault) and the client maps them all when it attaches (populate), so copies do not
    # pay first-touch page faults (nor do the cold memcpy's rings, which are filled first).
    node = KvmeshProcess(["cachenode", "--standalone", "--storage", "memory://?capacity=1GiB&arena=shm&prefault=true",
                          "--max-pinned-fraction", "0.9"])
    try:
        address = node.wait_ready(30)
        print(f"cache node: pid {node.pid} at {address} (memory://?capacity=1GiB&arena=shm); client: pid {os.getpid()}")
        channel = open_channel(address)
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        path = await LocalDataPath.open(stub, client_id="bench", populate=True)
        results: dict[tuple[int, int], dict[str, Samples]] = {}
        cases: list[tuple[tuple[int, int], str, Callable[[], Awaitable[object]], Samples]] = []
        for size, batch in LOCAL_CASES:
            keys = [f"v{size}-{i}".encode() for i in range(batch)]
            sources = [np.frombuffer(os.urandom(size), dtype=np.uint8) for _ in range(batch)]
            outs = [np.empty(size, dtype=np.uint8) for _ in range(batch)]
            await path.batch_put_from("bench", keys, sources)
            cold = ColdCopy(size, batch)

            async def put(keys: list[bytes] = keys, sources: list[np.ndarray] = sources) -> None:
                await path.batch_put_from("bench", keys, sources)

            async def get(keys: list[bytes] = keys, outs: list[np.ndarray] = outs) -> None:
                sizes = await path.batch_get_into("bench", keys, outs)
                assert all(s == outs[0].nbytes for s in sizes), sizes

            got = {name: Samples(size * batch) for name in ("memcpy", "put", "get")}
            results[(size, batch)] = got
            ops: list[tuple[str, Callable[[], Awaitable[object]]]] = [("memcpy", cold.op), ("put", put), ("get", get)]
            for name, op in ops:
                cases.append(((size, batch), name, op, got[name]))
            await get()
            assert all(np.array_equal(o, s) for o, s in zip(outs, sources, strict=True)), "values differ"
        # The control exchange alone (a get of a missing key: one Acquire, nothing to copy),
        # over the local control socket and as a gRPC call.
        miss_buf = bytearray(8)
        socket_rtt, grpc_rtt = Samples(0), Samples(0)

        async def socket_exchange() -> None:
            await path.batch_get_into("bench", [b"absent"], [miss_buf])

        async def grpc_exchange() -> None:
            await stub.Acquire(cachenode_pb2.AcquireRequest(session_id=path.session_id, namespace="bench",
                                                            keys=[b"absent"]))

        cases.append(((0, 0), "socket", socket_exchange, socket_rtt))
        cases.append(((0, 0), "grpc", grpc_exchange, grpc_rtt))
        per_case = seconds / len(cases)
        for r in range(rounds):  # interleaved: every case once per round, so drift hits all alike
            for _, _, case_op, samples in cases:
                await run_round(case_op, samples, per_case, min_ops=3)
            print(f"  round {r + 1}/{rounds} done", flush=True)
        print_local_table(results, rounds)
        print(f"  one control exchange alone (Acquire of a missing key), p50/p99 ms: local control socket "
              f"{socket_rtt.pct_ms(0.5):.3f}/{socket_rtt.pct_ms(0.99):.3f}, gRPC "
              f"{grpc_rtt.pct_ms(0.5):.3f}/{grpc_rtt.pct_ms(0.99):.3f}")
        if grpc_rate or write_rate is not None:
            rate = await remote_batch_get_gbps(address, node.ready["data_endpoint"], seconds, rounds)
            print(f"\nremote path on loopback (client library over the bulk data plane, batch_get_into of "
                  f"32 x 2 MiB, one call in flight): {rate:.2f} GB/s; simulator flag: --pool-gbps {rate:.2f}")
            if write_rate is not None:
                from kvmesh.tools.replay.transfer import save_pool_rate

                save_pool_rate(write_rate, rate, "kvmesh remote path on loopback (data plane, batch_get_into of "
                                                 "32 x 2 MiB), python -m bench.fastpath")
                print(f"wrote {write_rate} (read by kvmesh bench trace / kvmesh up --pool-rate-file)")
        await path.close()
        await channel.close()
    finally:
        node.terminate()


def print_local_table(results: dict[tuple[int, int], dict[str, Samples]], rounds: int) -> None:
    rows, verdicts = [], []
    for (size, batch), got in results.items():
        cold, put, get = got["memcpy"].gbps(), got["put"].gbps(), got["get"].gbps()
        target = TARGETS.get((size, batch))
        mark = ""
        if target is not None:
            ok = put / cold >= target and get / cold >= target
            mark = f">= {target:.0%}: {'met' if ok else 'MISSED'}"
            verdicts.append(f"{size_name(size)} x{batch}: put {put / cold:.0%}, get {get / cold:.0%} of cold "
                            f"memcpy (target {mark})")
        rows.append([
            size_name(size), str(batch), f"{cold:.2f}", f"{put:.2f}", f"{get:.2f}",
            f"{got['put'].pct_ms(0.5):.3f}/{got['put'].pct_ms(0.99):.3f}",
            f"{got['get'].pct_ms(0.5):.3f}/{got['get'].pct_ms(0.99):.3f}",
            f"{got['memcpy'].pct_ms(0.5):.3f}",
            f"{put / cold:.0%}/{get / cold:.0%}", mark,
        ])
    table(
        f"Local path (shared memory, node in another process) vs a cold memcpy, GB/s (median of {rounds} "
        "interleaved rounds), 1 call in flight",
        ["value", "batch", "cold memcpy", "put_from", "get_into", "put p50/p99 ms", "get p50/p99 ms",
         "memcpy p50 ms", "put/get of memcpy", "target"],
        rows,
    )
    print("  one call = batch_put_from / batch_get_into of `batch` values: one Allocate + one Seal, or one "
          "Acquire (its release rides on the next call), over the node's local control socket")
    print(f"  cold memcpy: numpy copy of the same bytes between rings of {COLD_WORKING_SET // MiB} MiB (uncached)")
    for line in verdicts:
        print("  " + line)


async def remote_batch_get_gbps(address: str, data_endpoint: str, seconds: float, rounds: int) -> float:
    """What a remote engine gets from the pool here: the client library's batched get into its own
    buffers over the bulk data plane, as for a node on another host."""
    from kvmesh.client import CacheClient, NodeInfo

    node = NodeInfo("n", address, 1 << 30, data_endpoint=data_endpoint)
    client = await CacheClient.from_nodes([node], namespace="rate", local="never")
    try:
        items = [(f"r{i}".encode(), os.urandom(2 * MiB)) for i in range(32)]
        assert await client.put_many(items) == len(items)
        keys = [k for k, _ in items]
        buffers = [np.empty(2 * MiB, dtype=np.uint8) for _ in keys]

        async def get() -> None:
            sizes = await client.batch_get_into(keys, buffers)
            assert sizes == [2 * MiB] * len(keys), sizes

        samples = Samples(32 * 2 * MiB)
        for _ in range(rounds):
            await run_round(get, samples, seconds / 4, min_ops=2)
        return samples.gbps()
    finally:
        await client.close()


async def bench_gpu(seconds: float) -> None:
    import torch

    if not torch.cuda.is_available():
        print("\nGPU tier: skipped (no CUDA device on this machine; run this on one to fill the table)")
        return
    from kvmesh.services.cachenode.storage.gpu import GpuStorage
    from kvmesh.uri import parse_uri

    storage = await GpuStorage.create(parse_uri("gpu://cuda:0?capacity=1GiB"))
    node = KvmeshProcess(["cachenode", "--standalone", "--storage", "gpu://cuda:0?capacity=1GiB"])
    try:
        address = node.wait_ready(60)
        channel = open_channel(address)
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        rows = []
        for size in SIZES:
            value = os.urandom(size)

            async def h2d(i: int, value: bytes = value) -> None:
                await storage.put("bench", b"gpu", value)

            async def d2h(i: int) -> None:
                await storage.get("bench", b"gpu")

            gput, gget = await grpc_ops(stub, value, "bench")
            rows.append(
                [
                    f"{size // MiB} MiB",
                    f"{await timed(h2d, size, seconds):.2f}",
                    f"{await timed(d2h, size, seconds):.2f}",
                    f"{await timed(gput, size, seconds):.2f}",
                    f"{await timed(gget, size, seconds):.2f}",
                ]
            )
        await channel.close()
        table(
            f"GPU tier on {torch.cuda.get_device_name(0)}, GB/s",
            ["size", "storage host→device", "storage device→host", "node put (gRPC)", "node get (gRPC)"],
            rows,
        )
    finally:
        node.terminate()
        await storage.close()


async def bench_rdma(seconds: float, protocol: str) -> None:
    from kvmesh.client.rdma import RdmaDataPath

    storage = f"rdma://127.0.0.1?capacity=256MiB&protocol={protocol}"
    node = KvmeshProcess(["cachenode", "--standalone", "--storage", storage], env={"MC_TCP_BIND_ADDRESS": "127.0.0.1"})
    try:
        address = node.wait_ready(60)
        channel = open_channel(address)
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        path = await RdmaDataPath.open(stub, local_hostname="127.0.0.1", protocol=protocol, buffer_bytes=32 * MiB)
        rows = []
        for size in SIZES:
            value = os.urandom(size)
            out = memoryview(bytearray(size))

            async def rput(i: int, value: bytes = value) -> None:
                await path.put("bench", b"rdma", value)

            async def rget(i: int, out: memoryview = out) -> None:
                assert await path.get_into("bench", b"rdma", out) == len(out)

            gput, gget = await grpc_ops(stub, value, "bench")
            rp, rg = await timed(rput, size, seconds), await timed(rget, size, seconds)
            gp, gg = await timed(gput, size, seconds), await timed(gget, size, seconds)
            rows.append(
                [f"{size // MiB} MiB", f"{rp:.2f}", f"{rg:.2f}", f"{gp:.2f}", f"{gg:.2f}", f"{rp / gp:.2f}x",
                 f"{rg / gg:.2f}x"]
            )
        await path.close()
        await channel.close()
        table(
            f"Remote path over Mooncake transfer engine ({protocol} transport) vs gRPC, GB/s, 1 op in flight",
            ["size", f"{protocol} put", f"{protocol} get", "grpc put", "grpc get", "put ratio", "get ratio"],
            rows,
        )
    finally:
        node.terminate()


def rerun_in_private_netns(argv: list[str]) -> int:
    """The TCP transport binds real ports: run the RDMA benchmark in its own network namespace."""
    unshare = shutil.which("unshare")
    if unshare is None:
        print("unshare not found: run the --rdma benchmark inside a private network namespace yourself")
        return 2
    inner = " ".join([sys.executable, "-m", "bench.fastpath", *argv, "--in-netns"])
    return subprocess.call([unshare, "-n", "sh", "-c", f"ip link set lo up && exec {inner}"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run")
    parser.add_argument("--seconds", type=float, default=None, help="time per measurement")
    parser.add_argument("--rdma", action="store_true", help="benchmark the rdma:// path instead of the local one")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the local-path table")
    parser.add_argument("--write-rate", type=Path, default=None, metavar="FILE",
                        help="measure the remote path's batched get rate and write it for the simulator's "
                             "--pool-rate-file (e.g. ~/.cache/kvmesh/pool-rate.json)")
    parser.add_argument("--no-gpu", action="store_true", help="skip the GPU table")
    parser.add_argument("--protocol", default="tcp", help="Mooncake transport for --rdma (tcp here, rdma with NICs)")
    parser.add_argument("--in-netns", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    seconds = args.seconds if args.seconds is not None else (0.3 if args.quick else 2.0)
    rounds = 3 if args.quick and args.rounds == 5 else args.rounds
    if args.rdma:
        if args.protocol == "tcp" and not args.in_netns:
            return rerun_in_private_netns([a for a in sys.argv[1:]])
        asyncio.run(bench_rdma(seconds, args.protocol))
        return 0
    import uvloop  # what the services and inference servers (vLLM) run on

    uvloop.run(bench_local(seconds * 7, rounds, args.write_rate, grpc_rate=True))
    if not args.no_gpu:
        asyncio.run(bench_gpu(seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
