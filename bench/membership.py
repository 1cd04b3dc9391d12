"""Membership: propagation, failure detection and 1,000 heartbeating members, per backend.

    .venv/bin/python -m bench.membership [--quick] [--backends memory,etcd,redis]

For each backend a real `kvmesh metadata` process (over a real etcd or redis-server
where needed) is measured for:
  propagation  Register returns → the JOIN reaches a watcher on another channel (p50/p99)
  detection    a member process is SIGKILLed → its LEAVE reaches the watcher (mean/max),
               against ttl + 1 s
  1,000 members  heartbeating at the interval the server sets (ttl 3 s → 1 Hz), with
               changing load; CPU of the metadata process (and of the backend server)
               from /proc, heartbeats/s and load UPDATE events/s seen by a watcher
Targets: propagation p99 <= 50 ms (memory) / 250 ms (etcd, redis); detection <= ttl + 1 s;
1,000 members with the metadata process under half a core.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from kvmesh.runtime.channels import open_channel
from kvmesh.tools.processes import KvmeshProcess, kvmesh_env
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.servers import ServerHandle, start_etcd, start_redis
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc

TARGET_P99_MS = {"memory": 50.0, "etcd": 250.0, "redis": 250.0}
DETECT_TTL = 2  # etcd's smallest lease; the same for every backend so figures compare
SCALE_TTL = 3  # heartbeat interval ttl/3 = 1 s
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Figures:
    backend: str
    join_ms: list[float] = field(default_factory=list)
    detect_s: list[float] = field(default_factory=list)
    members: int = 0
    heartbeats_per_s: float = 0.0
    updates_per_s: float = 0.0
    metadata_cores: float = 0.0
    backend_cores: float | None = None
    register_s: float = 0.0
    register_failures: int = 0
    leases_lost: int = 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def member(member_id: str, port: int = 9000) -> common_pb2.Member:
    return common_pb2.Member(id=member_id, role=common_pb2.ROLE_ENGINE, address=f"127.0.0.1:{port}")


class Watch:
    """A Watch stream read by a task; records when each member's JOIN / LEAVE arrived."""

    def __init__(self, address: str) -> None:
        self.channel = open_channel(address)
        self.joined: dict[str, float] = {}
        self.left: dict[str, float] = {}
        self.updates = 0
        self.synced = asyncio.Event()
        self._task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        stub = metadata_pb2_grpc.MembershipStub(self.channel)
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for event in stub.Watch(metadata_pb2.WatchRequest(role=common_pb2.ROLE_ENGINE)):
                now = time.perf_counter()
                if event.type == metadata_pb2.SNAPSHOT:
                    self.synced.set()
                for m in event.members:
                    if event.type == metadata_pb2.JOIN:
                        self.joined[m.id] = now
                    elif event.type == metadata_pb2.LEAVE:
                        self.left[m.id] = now
                    elif event.type == metadata_pb2.UPDATE:
                        self.updates += 1

    async def wait(self, table: dict[str, float], member_id: str, timeout: float) -> float:
        end = time.monotonic() + timeout
        while member_id not in table:
            if time.monotonic() > end:
                raise TimeoutError(f"no event for {member_id}")
            await asyncio.sleep(0.0005)
        return table[member_id]

    async def close(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.channel.close()


async def propagation(address: str, watch: Watch, count: int, figures: Figures) -> None:
    async with open_channel(address) as channel:
        stub = metadata_pb2_grpc.MembershipStub(channel)
        leases = []
        for i in range(count):
            member_id = f"join-{i}"
            started = time.perf_counter()
            reg = await stub.Register(metadata_pb2.RegisterRequest(member=member(member_id), ttl_seconds=30))
            seen = await watch.wait(watch.joined, member_id, 10)
            figures.join_ms.append((seen - started) * 1000)
            leases.append(reg.lease_id)
            await asyncio.sleep(0.01)
        for lease in leases:
            await stub.Deregister(metadata_pb2.DeregisterRequest(lease_id=lease))


def member_process(address: str, member_id: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.membership", "--run-member", address, member_id],
        env=kvmesh_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


async def detection(address: str, watch: Watch, count: int, figures: Figures) -> None:
    for i in range(count):
        member_id = f"doomed-{i}"
        proc = member_process(address, member_id)
        try:
            await watch.wait(watch.joined, member_id, 20)
            await asyncio.sleep(random.uniform(0.5, 1.5))  # kill at a random point of the heartbeat cycle
            killed = time.perf_counter()
            proc.send_signal(signal.SIGKILL)
            gone = await watch.wait(watch.left, member_id, DETECT_TTL + 10)
            figures.detect_s.append(gone - killed)
        finally:
            proc.kill()
            proc.wait()


async def heartbeater(stub: metadata_pb2_grpc.MembershipStub, lease: int, stop: asyncio.Event,
                      counter: list[int]) -> None:
    call = stub.KeepAlive()
    last = time.perf_counter()
    try:
        while not stop.is_set():
            load = common_pb2.Load(running_requests=random.randint(0, 8), kv_usage=random.random())
            await call.write(metadata_pb2.KeepAliveRequest(lease_id=lease, load=load))
            try:
                resp = await call.read()
            except grpc.aio.AioRpcError as exc:
                if not stop.is_set():
                    print(f"  heartbeat failed {time.perf_counter() - last:.2f} s after the last: "
                          f"{exc.code().name}", file=sys.stderr)
                return
            last = time.perf_counter()
            counter[0] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), resp.heartbeat_interval_ms / 1000)
    finally:
        call.cancel()


async def scale(address: str, watch: Watch, members: int, window_s: float, metadata_pid: int,
                backend_pid: int | None, figures: Figures) -> None:
    channels = [open_channel(address) for _ in range(max(1, members // 100))]
    stubs = [metadata_pb2_grpc.MembershipStub(c) for c in channels]
    gate = asyncio.Semaphore(16)

    stop = asyncio.Event()
    counter = [0]
    leases: list[int] = []
    attempts: list[bool] = []
    registered = asyncio.Event()

    async def live(i: int) -> None:
        """Like a real member: register, then heartbeat at once."""
        try:
            async with gate:
                reg = await stubs[i % len(stubs)].Register(
                    metadata_pb2.RegisterRequest(member=member(f"m-{i}", 10000 + i), ttl_seconds=SCALE_TTL),
                    timeout=30)
            leases.append(reg.lease_id)
            attempts.append(True)
        except grpc.aio.AioRpcError as exc:
            attempts.append(False)
            print(f"  register failed: {exc.code().name} {exc.details()}", file=sys.stderr)
            return
        finally:
            if len(attempts) == members:
                registered.set()
        await heartbeater(stubs[i % len(stubs)], reg.lease_id, stop, counter)

    started = time.perf_counter()
    tasks = [asyncio.create_task(live(i)) for i in range(members)]
    await asyncio.wait_for(registered.wait(), 300)
    figures.register_s = time.perf_counter() - started
    figures.register_failures = attempts.count(False)
    try:
        await asyncio.sleep(3.0)  # warm up: every stream open, intervals settled
        beats, updates = counter[0], watch.updates
        cpu0 = cpu_seconds(metadata_pid)
        bcpu0 = cpu_seconds(backend_pid) if backend_pid else 0.0
        t0 = time.perf_counter()
        await asyncio.sleep(window_s)
        elapsed = time.perf_counter() - t0
        figures.metadata_cores = (cpu_seconds(metadata_pid) - cpu0) / elapsed
        if backend_pid:
            figures.backend_cores = (cpu_seconds(backend_pid) - bcpu0) / elapsed
        figures.heartbeats_per_s = (counter[0] - beats) / elapsed
        figures.updates_per_s = (watch.updates - updates) / elapsed
        figures.members = members
        figures.leases_lost = len([m for m in watch.left if m.startswith("m-")])
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        async with open_channel(address) as channel:
            stub = metadata_pb2_grpc.MembershipStub(channel)
            await asyncio.gather(*(stub.Deregister(metadata_pb2.DeregisterRequest(lease_id=lease))
                                   for lease in leases), return_exceptions=True)
        for c in channels:
            await c.close()


@contextlib.contextmanager
def backend_server(name: str, workdir: Path) -> Iterator[tuple[str, ServerHandle | None]]:
    if name == "memory":
        yield "memory://", None
        return
    handle = start_etcd(workdir) if name == "etcd" else start_redis(workdir)
    try:
        uri = f"etcd://{handle.address}" if name == "etcd" else f"redis://{handle.address}/0"
        yield uri, handle
    finally:
        handle.stop()


async def run_backend(name: str, quick: bool) -> Figures:
    figures = Figures(name)
    with tempfile.TemporaryDirectory(prefix=f"kvmesh-bench-{name}-") as tmp, \
            backend_server(name, Path(tmp)) as (uri, server):
        address = f"127.0.0.1:{free_port()}"
        proc = KvmeshProcess(["metadata", "--listen", address, "--backend", uri, "--log-level", "warning"])
        try:
            proc.wait_ready(30)
            watch = Watch(address)
            try:
                await asyncio.wait_for(watch.synced.wait(), 10)
                print(f"[{name}] propagation", flush=True)
                await propagation(address, watch, 50 if quick else 300, figures)
                print(f"[{name}] failure detection", flush=True)
                await detection(address, watch, 2 if quick else 5, figures)
                print(f"[{name}] 1,000 members", flush=True)
                backend_pid = server.process.pid if server and server.process else None
                await scale(address, watch, 1000, 8.0 if quick else 30.0, proc.pid, backend_pid, figures)
            finally:
                await watch.close()
        finally:
            proc.terminate()
    return figures


def report(results: list[Figures]) -> None:
    rows = [("backend", "join p50 ms", "join p99 ms (target)", "detect mean/max s (target)",
             "members (reg s, failed, lost)", "heartbeats/s", "UPDATE/s", "metadata cores (target)", "backend cores")]
    for f in results:
        rows.append((
            f.backend,
            f"{statistics.median(f.join_ms):.1f}",
            f"{pct(f.join_ms, 0.99):.1f} (<= {TARGET_P99_MS[f.backend]:.0f}) "
            + ("ok" if pct(f.join_ms, 0.99) <= TARGET_P99_MS[f.backend] else "MISS"),
            f"{statistics.mean(f.detect_s):.2f}/{max(f.detect_s):.2f} (<= {DETECT_TTL + 1}) "
            + ("ok" if max(f.detect_s) <= DETECT_TTL + 1 else "MISS"),
            f"{f.members} ({f.register_s:.1f}, {f.register_failures}, {f.leases_lost})",
            f"{f.heartbeats_per_s:.0f}",
            f"{f.updates_per_s:.0f}",
            f"{f.metadata_cores:.2f} (< 0.5) " + ("ok" if f.metadata_cores < 0.5 else "MISS"),
            "-" if f.backend_cores is None else f"{f.backend_cores:.2f}",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


async def run_member(address: str, member_id: str) -> None:
    """A member process for the detection bench: registers and heartbeats until killed."""
    from kvmesh.membership import MemberSession

    session = MemberSession([address], member(member_id), ttl_seconds=DETECT_TTL)
    await session.start()
    await asyncio.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short run (fewer joins, kills, shorter window)")
    parser.add_argument("--backends", default="memory,etcd,redis", help="comma-separated: memory,etcd,redis")
    parser.add_argument("--run-member", nargs=2, metavar=("ADDRESS", "ID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_member:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_member(*args.run_member))
        return 0
    results = []
    for name in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if name not in TARGET_P99_MS:
            parser.error(f"unknown backend {name!r}")
        results.append(asyncio.run(run_backend(name, args.quick)))
    print()
    print(f"membership benchmark ({'quick' if args.quick else 'full'}; {os.cpu_count()} CPUs, shared machine)")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
