"""Fixtures shared by every test: real servers on loopback, kvmesh processes, leak checks."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator, Sequence

import pytest

from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.mesh import reap
from kvmesh.tools.testing.servers import ServerHandle, etcd_server, redis_server


@pytest.fixture(scope="session")
def redis() -> Iterator[ServerHandle]:
    """A real Redis on a free loopback port for the whole session."""
    with redis_server() as handle:
        yield handle


@pytest.fixture(scope="session")
def etcd() -> Iterator[ServerHandle]:
    """A real etcd on a free loopback port for the whole session."""
    with etcd_server() as handle:
        yield handle


KvmeshFactory = Callable[..., KvmeshProcess]


@pytest.fixture
def kvmesh() -> Iterator[KvmeshFactory]:
    """Starts single `kvmesh ...` commands (a CLI call, a bad flag) whose output a test inspects;
    stops them all afterwards with the mesh's leak check. A test that needs a mesh uses
    `process_mesh` instead."""
    started: list[KvmeshProcess] = []

    def start(*args: str, env: dict[str, str] | None = None, ready: bool = True, timeout: float = 20.0,
              name: str | None = None) -> KvmeshProcess:
        proc = KvmeshProcess(list(args), env=env, name=name)
        started.append(proc)
        if ready:
            proc.wait_ready(timeout)
        return proc

    yield start
    for proc in reversed(started):
        proc.send_term()
    for proc in reversed(started):
        proc.wait(15)
    leaked = reap(started)
    assert not leaked, f"processes still running after teardown: {leaked}"


@pytest.fixture(autouse=True)
async def _no_leaked_tasks() -> object:
    """Fails an async test that leaves background tasks running on its loop."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        yield None
        return
    before = set(asyncio.all_tasks(loop))
    yield None
    await asyncio.sleep(0)
    leftover = [t for t in asyncio.all_tasks(loop) - before if not t.done() and t is not asyncio.current_task()]
    for t in leftover:
        t.cancel()
    names = sorted(t.get_name() for t in leftover)
    assert not [n for n in names if not n.startswith(("Task-", "grpc"))], f"leaked tasks: {names}"


def pytest_collection_modifyitems(items: Sequence[pytest.Item]) -> None:
    """Integration tests run last, so a quick failure shows up first."""
    items_list = list(items)
    items_list.sort(key=lambda item: 1 if item.get_closest_marker("integration") else 0)
    items[:] = items_list  # type: ignore[index]
