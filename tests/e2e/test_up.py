"""`kvmesh up` as a real subprocess: starts every member, registers them, stops leaving nothing."""

from __future__ import annotations

import signal
import time

import pytest

from kvmesh.tools.testing.servers import ServerHandle
from tests.conftest import KvmeshFactory
from tests.e2e.mesh import alive, member_roles, ready_fields

pytestmark = pytest.mark.integration

SMALL = ("--base-port", "0", "--cachenodes", "1", "--engines", "2", "--pool-blocks", "256", "--log-level", "warning")


def _check_up_and_stop(proc, sig: int = signal.SIGTERM) -> None:
    fields = ready_fields(proc)
    pids = [int(p) for p in fields["pids"].split(",")]
    assert len(pids) == 5  # metadata, 1 cache node, router, 2 engines
    assert all(alive(p) for p in pids)
    roles = member_roles(fields["metadata"])
    assert roles == {"ROLE_CACHENODE": 1, "ROLE_ROUTER": 1, "ROLE_ENGINE": 2}
    assert "engine-1" in proc.output and fields["address"] in proc.output  # the members table
    proc.proc.send_signal(sig)
    assert proc.wait_exit(40) == 0, proc.output[-3000:]
    assert "all members stopped" in proc.output
    deadline = time.monotonic() + 5
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "children left behind"


def test_up_starts_and_stops_cleanly(kvmesh: KvmeshFactory) -> None:
    proc = kvmesh("up", *SMALL, timeout=90)
    _check_up_and_stop(proc, signal.SIGINT)


def test_up_with_etcd_backend(kvmesh: KvmeshFactory, etcd: ServerHandle) -> None:
    proc = kvmesh("up", *SMALL, "--backend", f"etcd://{etcd.address}?prefix=/kvmesh-up-{time.time_ns()}", timeout=90)
    fields = ready_fields(proc)
    assert "etcd://" in proc.output
    assert fields["metadata"]
    _check_up_and_stop(proc)


def test_up_with_redis_backend(kvmesh: KvmeshFactory, redis: ServerHandle) -> None:
    proc = kvmesh("up", *SMALL, "--backend", f"redis://{redis.address}/3", timeout=90)
    assert "redis://" in proc.output
    _check_up_and_stop(proc)


def test_killing_up_takes_its_children_with_it(kvmesh: KvmeshFactory) -> None:
    proc = kvmesh("up", *SMALL, timeout=90)
    pids = [int(p) for p in ready_fields(proc)["pids"].split(",")]
    proc.proc.kill()  # SIGKILL: no chance to stop them in order
    proc.proc.wait(10)
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if alive(p)], "children outlived a SIGKILLed kvmesh up"


def test_up_fails_cleanly_on_a_bad_backend(kvmesh: KvmeshFactory) -> None:
    proc = kvmesh("up", *SMALL, "--backend", "nosuch://x", "--start-timeout", "20", ready=False)
    assert proc.wait_exit(60) == 1
    assert "kvmesh up failed" in proc.output


def test_demo_runs_a_workload_and_stops(kvmesh: KvmeshFactory) -> None:
    proc = kvmesh("up", *SMALL, "--demo", "--demo-conversations", "5", timeout=90)
    pids = [int(p) for p in ready_fields(proc)["pids"].split(",")]
    assert proc.wait_exit(90) == 0, proc.output[-3000:]
    assert "kvmesh demo" in proc.output and "total hit" in proc.output
    assert not [p for p in pids if alive(p)]
