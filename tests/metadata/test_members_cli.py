"""`kvmesh members` against a real metadata process."""

from __future__ import annotations

import asyncio

import pytest

from kvmesh.membership import MemberSession
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.mesh import process_mesh
from kvmesh.tools.testing.polling import eventually
from kvmesh.tools.testing.ports import free_port
from kvmesh.v1 import common_pb2
from tests.conftest import KvmeshFactory
from tests.metadata.conftest import member

pytestmark = pytest.mark.integration
WIDE = {"COLUMNS": "200"}


def finished(proc: KvmeshProcess, timeout: float = 20.0) -> int:
    """Exit code once the process ended and all its output was read."""
    proc.wait_exit(timeout)
    return proc.terminate()


async def test_members_lists_filters_and_watches(kvmesh: KvmeshFactory) -> None:
    async with process_mesh(metadata_backend="memory://") as mesh:
        await _lists_filters_and_watches(kvmesh, mesh.metadata_address)


async def _lists_filters_and_watches(kvmesh: KvmeshFactory, address: str) -> None:
    """`kvmesh members` (one command each, the `kvmesh` fixture) against the mesh's metadata."""
    sessions = [
        MemberSession([address], member("eng-1", common_pb2.ROLE_ENGINE, 9001, model="llama-8b")),
        MemberSession([address], member("node-1", common_pb2.ROLE_CACHENODE, 9002, capacity_bytes=2 << 30)),
    ]
    try:
        for s in sessions:
            await s.start()
            await s.wait_registered(10)

        everyone = kvmesh("members", "--metadata", address, ready=False, env=WIDE)
        assert await asyncio.to_thread(finished, everyone) == 0, everyone.output
        assert "eng-1" in everyone.output and "node-1" in everyone.output
        assert "llama-8b" in everyone.output and "2.0GiB" in everyone.output.replace(" ", "")
        assert "2 members" in everyone.output

        engines = kvmesh("members", "--metadata", address, "--role", "engine", ready=False, env=WIDE)
        assert await asyncio.to_thread(finished, engines) == 0
        assert "eng-1" in engines.output and "node-1" not in engines.output

        follower = kvmesh("members", "--metadata", address, "--role", "engine", "--watch", ready=False, env=WIDE)
        await eventually(lambda: "1 members" in follower.output, timeout=20)
        late = MemberSession([address], member("eng-2", common_pb2.ROLE_ENGINE, 9003))
        sessions.append(late)
        await late.start()
        await late.wait_registered(10)
        await eventually(lambda: "JOIN engine eng-2 127.0.0.1:9003" in follower.output, timeout=10)
        await late.close()
        await eventually(lambda: "LEAVE engine eng-2" in follower.output, timeout=10)
        assert "node-1" not in follower.output
        assert follower.running()
    finally:
        for s in sessions:
            await s.close()


def test_members_reports_an_unreachable_metadata_service(kvmesh: KvmeshFactory) -> None:
    proc = kvmesh("members", "--metadata", f"127.0.0.1:{free_port()}", "--timeout", "1", ready=False)
    assert finished(proc) == 1
    assert "UNAVAILABLE" in proc.output or "DEADLINE_EXCEEDED" in proc.output
    bad = kvmesh("members", "--metadata", "nonsense", ready=False)
    assert finished(bad) == 2
    assert "invalid --metadata" in bad.output
