"""Cache node throughput and latency vs Redis and vs a no-op gRPC server, in one run.

    .venv/bin/python -m bench.cachenode [--quick] [--chunk-bytes 4MiB]

For 64 KiB, 1 MiB and 8 MiB values with 16 operations in flight, measures put and get
GB/s and p50/p99 latency of:
  kvmesh   a real `kvmesh cachenode` process (memory engine), BatchPut/BatchGet streams
  redis    a real redis-server through redis-py (asyncio, hiredis parser)
  noop     a grpc.aio server of the same shape (same RPCs, messages and chunking) that
           stores nothing: the transport ceiling
and prints the ratios against the targets (1 MiB: puts >= Redis, gets >= 2x Redis;
>= 85% of the no-op server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvmesh.runtime.channels import channel_options, open_channel
from kvmesh.testing.ports import free_port, wait_port
from kvmesh.testing.processes import KvmeshProcess, kvmesh_env
from kvmesh.testing.servers import start_redis
from kvmesh.units import format_size, parse_size
from kvmesh.v1 import cachenode_pb2 as pb
from kvmesh.v1 import cachenode_pb2_grpc

SIZES = [64 * 1024, 1024**2, 8 * 1024**2]
IN_FLIGHT = 16
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Result:
    system: str
    op: str
    size: int
    gbps: float
    p50_ms: float
    p99_ms: float


def ops_for(size: int, quick: bool) -> int:
    total = (256 if quick else 1024) * 1024**2  # bytes moved per case
    return max(IN_FLIGHT * 4, total // size)


async def drive(op: Callable[[int], Awaitable[None]], count: int) -> tuple[float, list[float]]:
    """Runs `count` operations with IN_FLIGHT at a time; returns (seconds, latencies)."""
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
    await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))
    return time.perf_counter() - start, latencies


def summarise(system: str, op: str, size: int, seconds: float, latencies: list[float]) -> Result:
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    gbps = len(latencies) * size / seconds / 1e9
    return Result(system, op, size, gbps, statistics.median(latencies) * 1e3, p99 * 1e3)


# -- gRPC systems (kvmesh and the no-op server share the client side) -----------------------


async def grpc_cases(system: str, address: str, quick: bool, chunk: int) -> list[Result]:
    out = []
    channel = open_channel(address)
    stub = cachenode_pb2_grpc.KVCacheStub(channel)
    try:
        for size in SIZES:
            value = os.urandom(size)
            slices = [value[o : o + chunk] for o in range(0, size, chunk)]
            count = ops_for(size, quick)

            async def put(i: int, size: int = size, slices: list[bytes] = slices) -> None:
                key = f"{size}-{i % 64}".encode()

                async def chunks() -> AsyncIterator[pb.PutChunk]:
                    offset = 0
                    for part in slices:
                        yield pb.PutChunk(namespace="b", key=key, total_size=size, offset=offset, data=part)
                        offset += len(part)

                resp = await stub.BatchPut(chunks())
                assert resp.stored == 1, resp

            async def get(i: int, size: int = size) -> None:
                got = 0
                async for c in stub.BatchGet(pb.BatchGetRequest(namespace="b", keys=[f"{size}-{i % 64}".encode()])):
                    got += len(c.data)
                assert got == size, (got, size)

            await drive(put, IN_FLIGHT * 4)  # warm-up (and fill the keys gets read)
            out.append(summarise(system, "put", size, *await drive(put, count)))
            await drive(get, IN_FLIGHT * 2)
            out.append(summarise(system, "get", size, *await drive(get, count)))
    finally:
        await channel.close()
    return out


class NoopServicer(cachenode_pb2_grpc.KVCacheServicer):
    """Same RPCs and message shapes as the cache node, storing nothing."""

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk
        self.blobs = {size: os.urandom(size) for size in SIZES}

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
                yield pb.GetChunk(
                    index=index, key=key, found=True, total_size=size, offset=offset,
                    data=blob[offset : offset + self.chunk],
                )


async def serve_noop(port: int, chunk: int) -> None:
    server = grpc.aio.server(options=channel_options())
    cachenode_pb2_grpc.add_KVCacheServicer_to_server(NoopServicer(chunk), server)  # type: ignore[abstract]
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("NOOP_READY", flush=True)
    await server.wait_for_termination()


# -- Redis -----------------------------------------------------------------------------------


async def redis_cases(port: int, quick: bool) -> list[Result]:
    import redis.asyncio as aioredis

    client = aioredis.Redis(host="127.0.0.1", port=port, max_connections=IN_FLIGHT * 2)
    out = []
    try:
        for size in SIZES:
            value = os.urandom(size)
            count = ops_for(size, quick)

            async def put(i: int, size: int = size, value: bytes = value) -> None:
                await client.set(f"{size}-{i % 64}", value)

            async def get(i: int, size: int = size) -> None:
                got = await client.get(f"{size}-{i % 64}")
                assert got is not None and len(got) == size

            await drive(put, IN_FLIGHT * 4)
            out.append(summarise("redis", "put", size, *await drive(put, count)))
            await drive(get, IN_FLIGHT * 2)
            out.append(summarise("redis", "get", size, *await drive(get, count)))
        await client.flushdb()
    finally:
        await client.aclose()
    return out


# -- the run ---------------------------------------------------------------------------------


def print_table(results: list[Result]) -> None:
    print(f"\n{'system':8} {'op':4} {'size':>9} {'GB/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for r in sorted(results, key=lambda r: (r.size, r.op, r.system)):
        print(f"{r.system:8} {r.op:4} {format_size(r.size):>9} {r.gbps:7.2f} {r.p50_ms:8.2f} {r.p99_ms:8.2f}")


def print_ratios(results: list[Result]) -> None:
    by = {(r.system, r.op, r.size): r.gbps for r in results}
    print("\nratios (kvmesh vs redis, kvmesh vs no-op gRPC)")
    for size in SIZES:
        for op in ("put", "get"):
            k, r, n = by[("kvmesh", op, size)], by[("redis", op, size)], by[("noop", op, size)]
            print(f"  {format_size(size):>9} {op}: {k / r:5.2f}x redis   {k / n * 100:5.1f}% of no-op")
    mib = 1024**2
    targets = [
        ("1 MiB put >= 1.0x redis", by[("kvmesh", "put", mib)] / by[("redis", "put", mib)], 1.0),
        ("1 MiB get >= 2.0x redis", by[("kvmesh", "get", mib)] / by[("redis", "get", mib)], 2.0),
        ("1 MiB put >= 85% of no-op", by[("kvmesh", "put", mib)] / by[("noop", "put", mib)], 0.85),
        ("1 MiB get >= 85% of no-op", by[("kvmesh", "get", mib)] / by[("noop", "get", mib)], 0.85),
    ]
    print("\ntargets")
    for name, value, goal in targets:
        print(f"  {name:28} {value:6.2f}  {'met' if value >= goal else 'MISSED'}")


async def measure(node_address: str, noop_address: str, redis_port: int, quick: bool, chunk: int) -> None:
    sizes = ", ".join(format_size(s) for s in SIZES)
    print(f"values {sizes}; {IN_FLIGHT} in flight; chunk {format_size(chunk)}")
    results = await grpc_cases("kvmesh", node_address, quick, chunk)
    results += await redis_cases(redis_port, quick)
    results += await grpc_cases("noop", noop_address, quick, chunk)
    print_table(results)
    print_ratios(results)


def run(quick: bool, chunk: int) -> None:
    """Starts the three servers as processes, measures, stops them."""
    import uvloop

    node = KvmeshProcess(
        ["cachenode", "--standalone", "--listen", "127.0.0.1:0", "--engine", "memory://?capacity=2GiB",
         "--chunk-bytes", str(chunk), "--log-level", "warning"],
        name="cachenode",
    )
    noop_port = free_port()
    noop = subprocess.Popen(
        [sys.executable, "-m", "bench.cachenode", "--serve-noop", str(noop_port), "--chunk-bytes", str(chunk)],
        env=kvmesh_env(), cwd=ROOT,
    )
    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-redis-") as tmp:
        redis = start_redis(Path(tmp))
        try:
            address = node.wait_ready(30)
            wait_port("127.0.0.1", noop_port, 30)
            uvloop.run(measure(address, f"127.0.0.1:{noop_port}", redis.port, quick, chunk))
        finally:
            redis.stop()
            node.terminate()
            noop.terminate()
            noop.wait(10)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="move 256 MiB per case instead of 1 GiB")
    parser.add_argument("--chunk-bytes", default="4MiB", help="data per stream message (both directions)")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    chunk = parse_size(args.chunk_bytes)
    import uvloop

    if args.serve_noop:
        uvloop.run(serve_noop(args.serve_noop, chunk))
        return 0
    run(args.quick, chunk)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
