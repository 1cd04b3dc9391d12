"""Cache node throughput and latency vs Redis and vs a no-op gRPC server, in one run.

    .venv/bin/python -m bench.cachenode [--quick] [--chunk-bytes 4MiB]

For 64 KiB, 1 MiB and 8 MiB values with 16 operations in flight, measures put and get
GB/s and p50/p99 latency of:
  kvmesh   a real `kvmesh cachenode` process (memory storage), BatchPut/BatchGet streams
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

from kvmesh import wire
from kvmesh.runtime.channels import channel_options, open_channel
from kvmesh.services.cachenode.kvcache_methods import add_kvcache_to_server
from kvmesh.tools.processes import KvmeshProcess, kvmesh_env
from kvmesh.tools.testing.ports import free_port, wait_port
from kvmesh.tools.testing.servers import start_redis
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


def ops_per_round(size: int, quick: bool) -> int:
    total = (64 if quick else 256) * 1024**2  # bytes moved per system, op, size and round
    return max(IN_FLIGHT * 2, total // size)


Op = Callable[[int], Awaitable[None]]


async def drive(op: Op, count: int) -> tuple[float, list[float]]:
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


class System:
    """One system under test: put/get operations for a value size."""

    name = ""

    def ops(self, size: int) -> tuple[Op, Op]:
        raise NotImplementedError

    async def close(self) -> None:
        """Releases connections."""


class GrpcSystem(System):
    """The cache node or the no-op server, called exactly as the client library calls them."""

    def __init__(self, name: str, address: str, chunk: int) -> None:
        self.name = name
        self.chunk = chunk
        self.channel = open_channel(address)
        # Hand-coded value messages (kvmesh.wire), as in kvmesh.client.
        self.batch_put = self.channel.stream_unary(
            "/kvmesh.v1.KVCache/BatchPut", request_serializer=wire.identity,
            response_deserializer=pb.BatchPutResponse.FromString,
        )
        self.batch_get = self.channel.unary_stream(
            "/kvmesh.v1.KVCache/BatchGet", request_serializer=pb.BatchGetRequest.SerializeToString,
            response_deserializer=wire.decode_get_chunk,
        )

    def ops(self, size: int) -> tuple[Op, Op]:
        value = memoryview(os.urandom(size))
        chunk = self.chunk

        async def put(i: int) -> None:
            key = f"{size}-{i % 64}".encode()

            async def chunks() -> AsyncIterator[bytes]:
                for offset in range(0, size, chunk):
                    yield wire.encode_put_chunk("b", key, size, offset, value[offset : offset + chunk])

            resp = await self.batch_put(chunks())
            assert resp.stored == 1, resp

        async def get(i: int) -> None:
            got = 0
            async for c in self.batch_get(pb.BatchGetRequest(namespace="b", keys=[f"{size}-{i % 64}".encode()])):
                got += len(c.data)
            assert got == size, (got, size)

        return put, get

    async def close(self) -> None:
        await self.channel.close()


class RedisSystem(System):
    """redis-server through redis-py's asyncio client (hiredis parser), one pool."""

    name = "redis"

    def __init__(self, port: int) -> None:
        import redis.asyncio as aioredis

        self.client = aioredis.Redis(host="127.0.0.1", port=port, max_connections=IN_FLIGHT * 2)

    def ops(self, size: int) -> tuple[Op, Op]:
        value = os.urandom(size)

        async def put(i: int) -> None:
            await self.client.set(f"{size}-{i % 64}", value)

        async def get(i: int) -> None:
            got = await self.client.get(f"{size}-{i % 64}")
            assert got is not None and len(got) == size

        return put, get

    async def close(self) -> None:
        await self.client.aclose()


async def compare(systems: list[System], quick: bool) -> list[Result]:
    """Interleaves the systems round by round (rotating who goes first), so load changes on a
    shared machine hit all of them alike; GB/s is the median of the rounds."""
    rounds = 3 if quick else 5
    out: list[Result] = []
    for size in SIZES:
        ops = {s.name: s.ops(size) for s in systems}
        count = ops_per_round(size, quick)
        for system in systems:  # warm-up, and the keys the gets read
            await drive(ops[system.name][0], IN_FLIGHT * 4)
            await drive(ops[system.name][1], IN_FLIGHT)
        for op_index, op in enumerate(("put", "get")):
            rates: dict[str, list[float]] = {s.name: [] for s in systems}
            latencies: dict[str, list[float]] = {s.name: [] for s in systems}
            for r in range(rounds):
                for system in systems[r % len(systems) :] + systems[: r % len(systems)]:
                    seconds, lat = await drive(ops[system.name][op_index], count)
                    rates[system.name].append(count * size / seconds / 1e9)
                    latencies[system.name] += lat
            for system in systems:
                lat = sorted(latencies[system.name])
                p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
                gbps = statistics.median(rates[system.name])
                out.append(Result(system.name, op, size, gbps, statistics.median(lat) * 1e3, p99 * 1e3))
    return out


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
    systems: list[System] = [
        GrpcSystem("kvmesh", node_address, chunk), RedisSystem(redis_port), GrpcSystem("noop", noop_address, chunk)
    ]
    try:
        results = await compare(systems, quick)
    finally:
        for system in systems:
            await system.close()
    print_table(results)
    print_ratios(results)


def run(quick: bool, chunk: int) -> None:
    """Starts the three servers as processes, measures, stops them."""
    import uvloop

    node = KvmeshProcess(
        ["cachenode", "--standalone", "--listen", "127.0.0.1:0", "--storage", "memory://?capacity=2GiB",
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
    parser.add_argument("--quick", action="store_true", help="3 rounds of 64 MiB per case instead of 5 of 256 MiB")
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
