"""`kvmesh up` as a real subprocess: starts every member, registers them, stops leaving nothing.

These run the one `kvmesh up` command and inspect it (the `kvmesh` fixture); `kvmesh up` itself
is the mesh under test, so they do not use the test mesh (`process_mesh`). `kvmesh up` is secure by
default: each test gives it its own state folder and connects with the `kvmesh-cli` certificate
it leaves there (tests/security/test_up_secure.py checks what is refused)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import pytest

from kvmesh.runtime.channels import open_channel
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.polling import eventually_sync
from kvmesh.tools.testing.servers import ServerHandle
from kvmesh.v1 import common_pb2, metadata_pb2, metadata_pb2_grpc
from tests.conftest import KvmeshFactory

pytestmark = pytest.mark.integration

SMALL = ("--base-port", "0", "--cachenodes", "1", "--engines", "2", "--pool-blocks", "256", "--log-level", "warning")


def ready_fields(proc: KvmeshProcess) -> dict[str, str]:
    """The fields of `kvmesh up`'s own ready line (its members print theirs too)."""
    for line in proc.lines:
        if line.startswith("KVMESH_READY service=mesh"):
            return dict(part.split("=", 1) for part in line.split()[1:])
    raise AssertionError(f"no ready line:\n{proc.output[-3000:]}")


def cli_tls(state: Path) -> ClientTLS:
    """The credentials `kvmesh up` leaves for a person's tools (`kvmesh-cli`) in its state folder."""
    return ClientTLS(TLSFiles(tls_cert=state / "kvmesh-cli.pem", tls_key=state / "kvmesh-cli-key.pem",
                              tls_ca=state / "ca.pem"))


def member_roles(metadata: str, tls: ClientTLS | None) -> Counter[str]:
    """How many members of each role the mesh's metadata service lists (plaintext with tls=None)."""
    async def go() -> Counter[str]:
        async with open_channel(metadata, tls=tls) as channel:
            resp = await metadata_pb2_grpc.MembershipStub(channel).List(metadata_pb2.ListRequest(), timeout=5)
        return Counter(common_pb2.Role.Name(m.role) for m in resp.members)

    return asyncio.run(go())


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for our purposes once reaped, so look closer.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(pids: list[int], timeout: float) -> None:
    """Waits until none of `pids` runs; fails naming those that still do."""
    eventually_sync(lambda: not [p for p in pids if alive(p)], timeout=timeout, interval=0.1,
                    what=f"children {pids} to exit")


def _check_up_and_stop(proc: KvmeshProcess, state: Path, sig: int = signal.SIGTERM) -> None:
    fields = ready_fields(proc)
    pids = [int(p) for p in fields["pids"].split(",")]
    assert len(pids) == 5  # metadata, 1 cache node, router, 2 engines
    assert all(alive(p) for p in pids)
    roles = member_roles(fields["metadata"], cli_tls(state))
    assert roles == {"ROLE_CACHENODE": 1, "ROLE_ROUTER": 1, "ROLE_ENGINE": 2}
    assert "engine-1" in proc.output and fields["address"] in proc.output  # the members table
    proc.proc.send_signal(sig)
    assert proc.wait_exit(40) == 0, proc.output[-3000:]
    assert "all members stopped" in proc.output
    wait_gone(pids, timeout=5)  # children left behind otherwise


def test_up_starts_and_stops_cleanly(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    proc = kvmesh("up", *SMALL, "--state-dir", str(tmp_path), timeout=90)
    _check_up_and_stop(proc, tmp_path, signal.SIGINT)


def test_up_with_etcd_backend(kvmesh: KvmeshFactory, etcd: ServerHandle, tmp_path: Path) -> None:
    proc = kvmesh("up", *SMALL, "--state-dir", str(tmp_path),
                  "--backend", f"etcd://{etcd.address}?prefix=/kvmesh-up-{time.time_ns()}", timeout=90)
    fields = ready_fields(proc)
    assert "etcd://" in proc.output
    assert fields["metadata"]
    _check_up_and_stop(proc, tmp_path)


def test_up_with_redis_backend(kvmesh: KvmeshFactory, redis: ServerHandle, tmp_path: Path) -> None:
    proc = kvmesh("up", *SMALL, "--state-dir", str(tmp_path), "--backend", f"redis://{redis.address}/3", timeout=90)
    assert "redis://" in proc.output
    _check_up_and_stop(proc, tmp_path)


def test_killing_up_takes_its_children_with_it(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    proc = kvmesh("up", *SMALL, "--state-dir", str(tmp_path), timeout=90)
    pids = [int(p) for p in ready_fields(proc)["pids"].split(",")]
    proc.proc.kill()  # SIGKILL: no chance to stop them in order
    proc.proc.wait(10)
    wait_gone(pids, timeout=30)  # children outlived a SIGKILLed kvmesh up otherwise


def test_up_fails_cleanly_on_a_bad_backend(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    proc = kvmesh("up", *SMALL, "--state-dir", str(tmp_path), "--backend", "nosuch://x", "--start-timeout", "20",
                  ready=False)
    assert proc.wait_exit(60) == 1
    assert "kvmesh up failed" in proc.output


def test_demo_runs_a_workload_and_stops(kvmesh: KvmeshFactory, tmp_path: Path) -> None:
    """The README's first command (`make run`): the demo, on mutual TLS with the policy enforced."""
    proc = kvmesh("up", *SMALL, "--state-dir", str(tmp_path), "--demo", "--demo-conversations", "5",
                  "--pool-gbps", "0.7", timeout=90)
    pids = [int(p) for p in ready_fields(proc)["pids"].split(",")]
    assert proc.wait_exit(90) == 0, proc.output[-3000:]
    assert "kvmesh demo" in proc.output and "total hit" in proc.output
    # The engines fetch at the given rate; the break-even and a production NIC's rate are shown beside it.
    assert "pool transfer rate: 0.70 GB/s (--pool-gbps)" in proc.output
    assert "fetching beats recomputing above 1.28 GB/s" in proc.output
    assert "@ 12.5 GB/s NIC" in proc.output
    assert "mutual TLS on, policy enforced" in proc.output and "--insecure" not in proc.output
    assert not [p for p in pids if alive(p)]
