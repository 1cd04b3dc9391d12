"""Soak: a mixed workload on a real mesh for a set time, with faults and a hostile client.

    .venv/bin/python -m bench.soak [--duration 90] [--quick] [--backend redis|etcd|memory]

The mesh: a Redis (or etcd) server, two `kvmesh metadata` replicas over it, two disk cache
nodes, one router. Well-behaved clients run all the time: engine members that register,
keep their leases and report KV events (one joins and leaves every few seconds: churn), a
gateway routing prompts and releasing them, a cache client putting and getting values.
Every `--fault-interval` seconds one fault strikes: SIGSTOP of the Redis/etcd server, of a
metadata replica or of a cache node for a couple of seconds, or SIGKILL of a metadata
replica or a cache node followed by a restart. Meanwhile a hostile client does what the
limits are for: BatchPut streams that announce huge values and stall, oversized labels,
request ids and model names, undecodable bodies, overwrites of a 1 MiB metadata key, and
fuzzed requests to every RPC.

Printed, next to their targets: errors seen by the well-behaved clients (only cache misses
may happen), route availability (>= 99.9% while engines live), p99 latencies, RSS of every
service over time (anonymous memory, flat within 10% after warm-up: a disk node's mapped
store pages grow with its data by design), and acknowledged values lost (0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmesh.client.cache import CacheClient
from kvmesh.membership import MemberSession
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.rss import rss_bytes
from kvmesh.tools.testing.servers import ServerHandle, start_etcd, start_redis
from kvmesh.v1 import (
    cachenode_pb2,
    cachenode_pb2_grpc,
    common_pb2,
    metadata_pb2,
    metadata_pb2_grpc,
    router_pb2,
    router_pb2_grpc,
)

TARGET_AVAILABILITY = 0.999
TARGET_RSS_DRIFT = 0.10
TREE_BLOCKS = 4096
MiB = 1024**2


@dataclass
class Service:
    """One process of the mesh: how to (re)start it and its RSS samples."""

    name: str
    args: list[str]
    process: KvmeshProcess | None = None
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds since this start, bytes)
    starts: int = 0
    started_at: float = 0.0

    def start(self) -> str:
        """Starts (or restarts: RSS is followed per incarnation) the process."""
        self.process = KvmeshProcess(self.args, name=self.name)
        self.starts += 1
        self.started_at = time.monotonic()
        self.rss = []
        return self.process.wait_ready(30)

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid


@dataclass
class Figures:
    routes: int = 0
    route_failures: Counter[str] = field(default_factory=Counter)
    route_ms: list[float] = field(default_factory=list)
    puts: int = 0
    puts_acked: int = 0
    gets: int = 0
    misses: int = 0
    corrupt: int = 0
    cache_ms: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # well-behaved clients, other than misses
    faults: Counter[str] = field(default_factory=Counter)
    hostile: Counter[str] = field(default_factory=Counter)
    lost: int = 0
    checked: int = 0


def p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100)[98] if len(values) >= 100 else max(values, default=0.0)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.rng = random.Random(7)
        self.figures = Figures()
        self.backend: ServerHandle | None = None
        self.services: dict[str, Service] = {}
        self.acked: dict[bytes, bytes] = {}  # key → sha256 of the value acknowledged
        self.stop = asyncio.Event()
        self.sessions: list[MemberSession] = []

    # -- mesh ----------------------------------------------------------------------------

    def start_mesh(self) -> None:
        kind = self.args.backend
        if kind == "redis":
            self.backend = start_redis(self.workdir)
            uri = f"redis://{self.backend.address}/0?sweep_ms=100"
        elif kind == "etcd":
            self.backend = start_etcd(self.workdir)
            uri = f"etcd://{self.backend.address}"
        else:
            uri = "memory://"
        md_ports = [free_port() for _ in range(2 if kind != "memory" else 1)]
        self.metadata = ",".join(f"127.0.0.1:{p}" for p in md_ports)
        for i, port in enumerate(md_ports):
            self.services[f"metadata-{i}"] = Service(
                f"metadata-{i}", ["metadata", "--listen", f"127.0.0.1:{port}", "--backend", uri])
        for i in range(2):
            store = self.workdir / f"node{i}"
            self.services[f"cachenode-{i}"] = Service(f"cachenode-{i}", [
                "cachenode", "--listen", f"127.0.0.1:{free_port()}", "--metadata", self.metadata,
                "--member-id", f"node{i}", "--ttl-seconds", "3", "--write-idle-timeout-seconds", "5",
                "--storage", f"disk://{store}?capacity=2GiB&sync=false",
            ])
        self.services["router"] = Service("router", [
            "router", "--listen", f"127.0.0.1:{free_port()}", "--metadata", self.metadata, "--policy", "prefix",
            # A small tree, so the workload fills it during warm-up: RSS then shows leaks, not the tree growing
            # to its bound (--max-tree-blocks, 1,000,000 by default).
            "--max-tree-blocks", str(TREE_BLOCKS), "--approx-ttl-seconds", "30",
        ])
        for service in self.services.values():
            service.start()
        self.router_address = self._address("router")

    def _address(self, name: str) -> str:
        process = self.services[name].process
        assert process is not None and process.address is not None
        return process.address

    def stop_mesh(self) -> None:
        for service in self.services.values():
            if service.process is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(service.pid, signal.SIGCONT)
                service.process.send_term()
        for service in self.services.values():
            if service.process is not None:
                service.process.wait(15)
                service.process.kill()
                service.process.close()
        if self.backend is not None and self.backend.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.backend.process.pid, signal.SIGCONT)
            self.backend.process.kill()
            self.backend.process.wait(10)

    # -- well-behaved clients --------------------------------------------------------------

    def engine(self, i: int) -> common_pb2.Member:
        return common_pb2.Member(id=f"engine-{i}", role=common_pb2.ROLE_ENGINE, address=f"127.0.0.1:{21000 + i}",
                                 model="soak")

    async def engines(self) -> None:
        """Three steady engines plus one that joins and leaves (churn), all reporting KV events."""
        addresses = self.metadata.split(",")
        for i in range(3):
            session = MemberSession(addresses, self.engine(i), ttl_seconds=3)
            await session.start()
            self.sessions.append(session)
        churn = 3
        while not self.stop.is_set():
            session = MemberSession(addresses, self.engine(churn), ttl_seconds=3)
            await session.start()
            await self._sleep(3.0)
            await session.close(deregister=True)
            churn += 1
            await self._sleep(1.0)

    async def events(self, channel: grpc.aio.Channel) -> None:
        stub = router_pb2_grpc.RouterStub(channel)
        while not self.stop.is_set():
            member = f"engine-{self.rng.randrange(3)}"
            chain = [self.rng.getrandbits(63) | 1 for _ in range(32)]
            batch = router_pb2.KvEventBatch(member_id=member, events=[
                router_pb2.KvEvent(stored=router_pb2.BlocksStored(parent_id=0, ids=chain))])
            try:
                await stub.ReportEvents(iter([batch]), timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.figures.errors[f"ReportEvents {exc.code().name}"] += 1
            await self._sleep(0.2)

    async def routes(self, channel: grpc.aio.Channel) -> None:
        stub = router_pb2_grpc.RouterStub(channel)
        prefixes = [[self.rng.getrandbits(63) for _ in range(16)] for _ in range(32)]
        i = 0
        while not self.stop.is_set():
            i += 1
            ids = [*self.rng.choice(prefixes), *(self.rng.getrandbits(63) for _ in range(4))]
            started = time.perf_counter()
            try:
                await stub.Route(router_pb2.RouteRequest(request_id=f"s{i}", model="soak",
                                                         blocks=router_pb2.BlockIds(ids=ids)), timeout=5)
                self.figures.route_ms.append((time.perf_counter() - started) * 1000)
                await stub.Release(router_pb2.ReleaseRequest(request_id=f"s{i}"), timeout=5)
            except grpc.aio.AioRpcError as exc:
                self.figures.route_failures[exc.code().name] += 1
            self.figures.routes += 1
            await self._sleep(0.01)

    async def cache(self) -> None:
        client = await CacheClient.connect(self.metadata, namespace="soak", local="never", retry_deadline_s=2.0)
        try:
            n = 0
            while not self.stop.is_set():
                n += 1
                key = hashlib.blake2b(f"k{n}".encode(), digest_size=16).digest()
                value = os.urandom(self.rng.choice([4096, 65536, 300_000]))
                started = time.perf_counter()
                try:
                    self.figures.puts += 1
                    if await client.put(key, value):
                        self.acked[key] = hashlib.sha256(value).digest()
                        self.figures.puts_acked += 1
                    if self.acked:
                        probe = self.rng.choice(list(self.acked)[-200:])
                        got = await client.get(probe)
                        self.figures.gets += 1
                        if got is None:
                            self.figures.misses += 1
                        elif hashlib.sha256(got).digest() != self.acked[probe]:
                            self.figures.corrupt += 1
                    self.figures.cache_ms.append((time.perf_counter() - started) * 1000)
                except Exception as exc:  # the client turns node failures into misses; anything else counts
                    self.figures.errors[f"cache {type(exc).__name__}"] += 1
                await self._sleep(0.02)
        finally:
            await client.close()

    # -- hostile client ----------------------------------------------------------------------

    async def hostile(self) -> None:
        md = grpc.aio.insecure_channel(self.metadata.split(",")[0])
        node = grpc.aio.insecure_channel(self._address("cachenode-0"))
        router = grpc.aio.insecure_channel(self.router_address)
        acts: list[Callable[[], Awaitable[None]]] = [
            lambda: self._stalled_put(node),
            lambda: self._call(metadata_pb2_grpc.MembershipStub(md).Register(metadata_pb2.RegisterRequest(
                member=common_pb2.Member(id="evil", role=common_pb2.ROLE_ENGINE, address="a:b:c:1",
                                         labels={f"l{i}": "x" * 1000 for i in range(60)}), ttl_seconds=10))),
            lambda: self._call(router_pb2_grpc.RouterStub(router).Route(router_pb2.RouteRequest(
                request_id="r" * MiB, model="m" * MiB, blocks=router_pb2.BlockIds(ids=[1])))),
            lambda: self._call(md.unary_unary("/kvmesh.v1.Metadata/Put")(b"\xff\xff\xff")),
            lambda: self._call(metadata_pb2_grpc.MetadataStub(md).Put(metadata_pb2.PutKeyRequest(
                key="hostile/big", value=os.urandom(MiB - 64)))),
        ]
        try:
            while not self.stop.is_set():
                act = self.rng.choice(acts)
                await act()
                await self._sleep(0.1)
        finally:
            for channel in (md, node, router):
                await channel.close()

    async def _call(self, call: Awaitable[object]) -> None:
        try:
            await asyncio.wait_for(call, 10)
            self.figures.hostile["OK"] += 1
        except grpc.aio.AioRpcError as exc:
            self.figures.hostile[exc.code().name] += 1
        except TimeoutError:
            self.figures.hostile["timeout"] += 1

    async def _stalled_put(self, channel: grpc.aio.Channel) -> None:
        stub = cachenode_pb2_grpc.KVCacheStub(channel)
        release = asyncio.Event()

        async def chunks() -> AsyncIterator[cachenode_pb2.PutChunk]:
            yield cachenode_pb2.PutChunk(namespace="soak", key=b"stall", total_size=200 * MiB, data=b"s" * 4096)
            await release.wait()

        call = stub.BatchPut(chunks())
        await self._sleep(2.0)
        release.set()
        await self._call(call)

    # -- faults and sampling -------------------------------------------------------------------

    async def faults(self) -> None:
        kinds = ["stop-metadata", "kill-metadata", "stop-cachenode", "kill-cachenode"]
        if self.backend is not None:
            kinds.append(f"stop-{self.args.backend}")
        if self.args.faults:
            kinds = [k for k in kinds if k in self.args.faults.split(",")]
        if not kinds:
            return
        await self._sleep(self.args.warmup)
        while not self.stop.is_set():
            kind = self.rng.choice(kinds)
            self.figures.faults[kind] += 1
            if kind.startswith("stop-") and kind.endswith(("redis", "etcd")):
                assert self.backend is not None and self.backend.process is not None
                await self._pause(self.backend.process.pid, 2.0)
            else:
                role = kind.split("-", 1)[1]
                name = self.rng.choice([n for n in self.services if n.startswith(role)])
                service = self.services[name]
                if kind.startswith("stop-"):
                    await self._pause(service.pid, 2.0 if role == "metadata" else 1.0)
                else:
                    assert service.process is not None
                    await asyncio.to_thread(service.process.kill)
                    service.process.close()
                    await asyncio.to_thread(service.start)
            await self._sleep(self.args.fault_interval)

    async def _pause(self, pid: int, seconds: float) -> None:
        os.kill(pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(seconds)
        finally:
            os.kill(pid, signal.SIGCONT)

    async def sample_rss(self) -> None:
        while not self.stop.is_set():
            for service in self.services.values():
                now = time.monotonic() - service.started_at
                if service.process is not None and service.process.running():
                    # Anonymous memory: a disk node's mapped LMDB pages grow with the data, by design.
                    service.rss.append((now, rss_bytes(service.pid, "RssAnon")))
            await self._sleep(1.0)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), seconds)

    # -- the run ----------------------------------------------------------------------------------

    async def run(self) -> None:
        channel = grpc.aio.insecure_channel(self.router_address)
        tasks = [asyncio.create_task(self.engines())]
        stub = router_pb2_grpc.RouterStub(channel)
        for _ in range(300):  # availability counts while engines live: from when the router knows them
            if (await stub.Stats(router_pb2.RouterStatsRequest(), timeout=5)).members >= 3:
                break
            await asyncio.sleep(0.1)
        tasks += [asyncio.create_task(coro) for coro in (
            self.routes(channel), self.events(channel), self.cache(), self.hostile(), self.faults(), self.sample_rss(),
        )]
        await asyncio.sleep(self.args.duration)
        self.stop.set()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                self.figures.errors[f"task {type(result).__name__}: {result}"[:120]] += 1
        for session in self.sessions:
            await session.close(deregister=True)
        await channel.close()
        await self.check_acknowledged()

    async def check_acknowledged(self) -> None:
        """Every acknowledged value must be on some cache node (all are back by now)."""
        await asyncio.sleep(2.0)
        nodes = [self._address(n) for n in self.services if n.startswith("cachenode")]
        channels = [grpc.aio.insecure_channel(a) for a in nodes]
        try:
            keys = list(self.acked)
            present = [False] * len(keys)
            for ch in channels:
                stub = cachenode_pb2_grpc.KVCacheStub(ch)
                for start in range(0, len(keys), 256):
                    part = keys[start : start + 256]
                    reply = await stub.Exists(cachenode_pb2.ExistsRequest(namespace="soak", keys=part), timeout=30)
                    for i, hit in enumerate(reply.present):
                        present[start + i] = present[start + i] or hit
            self.figures.checked = len(keys)
            self.figures.lost = present.count(False)
        finally:
            for ch in channels:
                await ch.close()

    def report(self) -> bool:
        f = self.figures
        ok = True

        def line(name: str, figure: str, target: str, good: bool) -> None:
            nonlocal ok
            ok = ok and good
            print(f"{name:<34} {figure:<28} target {target:<22} {'ok' if good else 'MISSED'}")

        available = 1 - sum(f.route_failures.values()) / max(1, f.routes)
        print(f"\nsoak: {self.args.duration:.0f} s, backend {self.args.backend}, "
              f"faults {dict(f.faults)}, hostile calls {dict(f.hostile)}")
        line("errors (well-behaved clients)", str(sum(f.errors.values())) + (f" {dict(f.errors)}" if f.errors else ""),
             "0 (misses allowed)", not f.errors and not f.corrupt)
        line("corrupt values read", str(f.corrupt), "0", f.corrupt == 0)
        line("cache misses", f"{f.misses} of {f.gets} gets", "(not errors)", True)
        line("route availability", f"{available:.4%} of {f.routes}", f">= {TARGET_AVAILABILITY:.1%}",
             available >= TARGET_AVAILABILITY)
        if f.route_failures:
            print(f"{'':<34} route failures {dict(f.route_failures)}")
        line("route p99", f"{p99(f.route_ms):.1f} ms", "(reported)", True)
        line("cache put+get p99", f"{p99(f.cache_ms):.1f} ms", "(reported)", True)
        line("acknowledged values lost", f"{f.lost} of {f.checked}", "0", f.lost == 0)
        warm = self.args.warmup
        for service in self.services.values():
            after = [r for t, r in service.rss if t >= warm]
            if len(after) < 4:
                print(f"{'RSS ' + service.name:<34} (restarted too late to compare)")
                continue
            base = statistics.median(after[: max(2, len(after) // 5)])
            end = statistics.median(after[-max(2, len(after) // 5) :])
            drift = (end - base) / base if base else 0.0
            curve = " ".join(f"{r / MiB:.0f}" for r in after[:: max(1, len(after) // 8)])
            restarts = f", {service.starts - 1} restarts" if service.starts > 1 else ""
            line(f"RSS {service.name}{restarts}", f"{base / MiB:.0f} -> {end / MiB:.0f} MiB ({drift:+.0%})",
                 f"within ±{TARGET_RSS_DRIFT:.0%}", abs(drift) <= TARGET_RSS_DRIFT)
            print(f"{'':<34} MiB over time: {curve}")
        return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=90.0, help="seconds of workload (default 90)")
    parser.add_argument("--warmup", type=float, default=20.0,
                        help="seconds before faults start and after each (re)start before RSS is compared")
    parser.add_argument("--fault-interval", type=float, default=6.0, help="seconds between faults")
    parser.add_argument("--backend", choices=["redis", "etcd", "memory"], default="redis")
    parser.add_argument("--faults", default="", help="comma-separated subset of: stop-metadata, kill-metadata, "
                        "stop-cachenode, kill-cachenode, stop-BACKEND (default: all)")
    parser.add_argument("--quick", action="store_true", help="a 30 s run (what `make bench --quick` does)")
    args = parser.parse_args()
    if args.quick:
        args.duration, args.warmup = 40.0, 10.0
    with tempfile.TemporaryDirectory(prefix="kvmesh-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            soak.start_mesh()
            asyncio.run(soak.run())
        finally:
            soak.stop_mesh()
        return 0 if soak.report() else 1


if __name__ == "__main__":
    sys.exit(main())
