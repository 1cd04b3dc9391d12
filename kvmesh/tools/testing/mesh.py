"""One way to bring a mesh up in tests: in-process (`local_mesh`) or as real processes (`process_mesh`).

Both yield the same `MeshHandle`: member addresses, cached channels and stubs, `wait_members`,
`add`/`stop`/`kill`/`restart` for failure tests. Both enforce a hard timeout on the whole block and
check for leaks on the way out: asyncio tasks started inside the block that outlive the mesh, and
child processes still running. Members listen on 127.0.0.1 with free ports unless a test pins one
(`metadata_listen=`, so a restarted metadata service comes back where its clients dial).

    async with local_mesh(cachenodes=2, routers=1) as mesh:
        await mesh.wait_members("cachenode", 2)
        stub = mesh.router_stub()
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import importlib
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import grpc

from kvmesh.membership.listing import list_members
from kvmesh.runtime.channels import open_channel
from kvmesh.runtime.server import ServerRuntime, Service
from kvmesh.settings import ServiceSettings
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.polling import eventually
from kvmesh.v1 import (
    cachenode_pb2_grpc,
    common_pb2,
    metadata_pb2_grpc,
    router_pb2_grpc,
)

Role = Literal["metadata", "cachenode", "router", "engine"]
Mode = Literal["local", "processes"]
ROLES: dict[str, int] = {
    "cachenode": common_pb2.ROLE_CACHENODE,
    "router": common_pb2.ROLE_ROUTER,
    "engine": common_pb2.ROLE_ENGINE,
}
_COMMAND = {"metadata": "metadata", "cachenode": "cachenode", "router": "router", "engine": "enginesim"}
DEFAULT_STORAGE = "memory://?capacity=64MiB"


@dataclass
class Member:
    """One running member: its runtime and service (in-process) or its process."""

    name: str
    role: str
    address: str
    settings: dict[str, Any]
    runtime: ServerRuntime | None = None
    process: KvmeshProcess | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # in-process constructor arguments (storage=...)

    @property
    def service(self) -> Any:
        """The in-process service object (`RouterService`, `CacheNodeService`, ...)."""
        assert self.runtime is not None, f"{self.name} runs as a process"
        return self.runtime.service


def _flags(settings: Mapping[str, Any]) -> list[str]:
    out: list[str] = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else f"--no-{key.replace('_', '-')}")
        else:
            out += [flag, str(value)]
    return out


# role → (service module, Service class, Settings class); imported lazily, so a test pulls in
# only the services it runs.
_SERVICES: dict[str, tuple[str, str, str]] = {
    "metadata": ("kvmesh.services.metadata", "MetadataService", "MetadataSettings"),
    "cachenode": ("kvmesh.services.cachenode", "CacheNodeService", "CacheNodeSettings"),
    "router": ("kvmesh.services.router", "RouterService", "RouterSettings"),
    "engine": ("kvmesh.services.enginesim", "EngineSimService", "EngineSimSettings"),
}


def _in_process(role: str, values: dict[str, Any], extra: dict[str, Any]) -> ServerRuntime:
    """A runtime for a role's service, built from the same settings its command line would give."""
    package, service_name, settings_name = _SERVICES[role]
    service_cls: type[Service] = getattr(importlib.import_module(f"{package}.service"), service_name)
    settings_cls: type[ServiceSettings] = getattr(importlib.import_module(f"{package}.settings"), settings_name)
    settings = settings_cls.model_validate(values)
    return ServerRuntime(service_cls(settings, **extra), settings)  # type: ignore[call-arg]


_OWNER: contextvars.ContextVar[MeshHandle | None] = contextvars.ContextVar("kvmesh_mesh_owner", default=None)


def _track_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """A task factory noting which mesh a task belongs to: one created (directly or by a task it
    created) while a member started or stopped. Tests' own client tasks are not the mesh's."""
    previous = loop.get_task_factory()
    if getattr(previous, "kvmesh_mesh", False):
        return

    def factory(loop: asyncio.AbstractEventLoop, coro: Any, context: contextvars.Context | None = None) -> Any:
        if previous is not None:
            task = previous(loop, coro) if context is None else previous(loop, coro, context=context)  # type: ignore[call-arg]
        else:
            task = asyncio.Task(coro, loop=loop, context=context)
        owner = context.get(_OWNER) if context is not None else _OWNER.get()
        if owner is not None:
            owner.tasks.add(task)  # type: ignore[arg-type]
        return task

    factory.kvmesh_mesh = True  # type: ignore[attr-defined]
    loop.set_task_factory(factory)


class MeshHandle:
    """The running mesh, the same in both modes."""

    def __init__(self, mode: Mode, grace_seconds: float, ready_timeout: float,
                 names: Mapping[str, str] | None = None) -> None:
        self.names = {"metadata": "metadata-{i}", "cachenode": "cachenode-{i}", "router": "router-{i}",
                      "engine": "engine-{i}", **(names or {})}
        self.tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self.mode = mode
        self.grace_seconds = grace_seconds
        self.ready_timeout = ready_timeout
        self.members: list[Member] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._stopped: list[Member] = []
        self._leaked: list[str] = []

    # -- where things are -------------------------------------------------------------------

    def of_role(self, role: str) -> list[Member]:
        return [m for m in self.members if m.role == role]

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)

    @property
    def metadata_address(self) -> str:
        return self.of_role("metadata")[0].address

    @property
    def metadata_addresses(self) -> list[str]:
        return [m.address for m in self.of_role("metadata")]

    @property
    def router_address(self) -> str:
        return self.of_role("router")[0].address

    def addresses(self, role: str) -> list[str]:
        return [m.address for m in self.of_role(role)]

    def channel(self, address: str) -> grpc.aio.Channel:
        """A channel to `address`, opened once and closed with the mesh."""
        if address not in self._channels:
            self._channels[address] = open_channel(address)
        return self._channels[address]

    def membership(self) -> metadata_pb2_grpc.MembershipStub:
        return metadata_pb2_grpc.MembershipStub(self.channel(self.metadata_address))

    def kv(self) -> metadata_pb2_grpc.MetadataStub:
        return metadata_pb2_grpc.MetadataStub(self.channel(self.metadata_address))

    def router_stub(self, index: int = 0) -> router_pb2_grpc.RouterStub:
        return router_pb2_grpc.RouterStub(self.channel(self.of_role("router")[index].address))

    def kvcache(self, index: int = 0) -> cachenode_pb2_grpc.KVCacheStub:
        return cachenode_pb2_grpc.KVCacheStub(self.channel(self.of_role("cachenode")[index].address))

    async def listed(self, role: str) -> list[common_pb2.Member]:
        """The members of `role` the (first) metadata service lists now."""
        members, _ = await list_members(self.membership(), ROLES[role], timeout=5)
        return members

    async def wait_members(self, role: str, count: int, timeout: float = 15.0) -> list[common_pb2.Member]:
        """Polls the metadata service until exactly `count` members of `role` are registered."""
        members: list[common_pb2.Member] = []

        async def check() -> bool:
            members[:] = await self.listed(role)
            assert len(members) == count, f"listed: {sorted(m.id for m in members)}"
            return True

        await eventually(check, timeout=timeout, interval=0.05, what=f"{count} {role} members",
                         retry_on=(AssertionError, grpc.aio.AioRpcError))
        return members

    # -- starting and stopping members ------------------------------------------------------

    def _settings(self, role: str, name: str, settings: Mapping[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {"listen": "127.0.0.1:0", "grace_seconds": self.grace_seconds}
        if role != "metadata":
            out["member_id"] = name
            if self.of_role("metadata"):
                out["metadata"] = ",".join(self.metadata_addresses)
            else:
                out["standalone"] = True
        if role == "cachenode" and not {"engine", "storage"} & set(settings):
            out["storage"] = DEFAULT_STORAGE
        out.update(settings)
        return out

    async def add(self, role: str, name: str | None = None, *, env: dict[str, str] | None = None,
                  extra: dict[str, Any] | None = None, **settings: Any) -> Member:
        """Starts one more member of `role`; `settings` are its settings fields (or flags, as
        processes), `extra` in-process constructor arguments (a custom `storage=` object)."""
        index = len(self.of_role(role)) + sum(m.role == role for m in self._stopped)
        name = name or self.names[role].format(i=index)
        member = Member(name, role, "", self._settings(role, name, settings), extra=dict(extra or {}))
        member.extra["env"] = env
        await self._start(member)
        self.members.append(member)
        return member

    async def _start(self, member: Member) -> None:
        extra = {k: v for k, v in member.extra.items() if k != "env"}
        if self.mode == "local":
            member.runtime = _in_process(member.role, dict(member.settings), extra)
            token = _OWNER.set(self)  # the server's tasks (and theirs) are this mesh's
            try:
                member.address = await member.runtime.start()
            finally:
                _OWNER.reset(token)
            return
        assert not extra, f"{member.name}: constructor arguments need mode='local'"
        args = [_COMMAND[member.role], *_flags(member.settings)]
        proc = KvmeshProcess(args, env=member.extra.get("env"), name=member.name, role=member.role)
        member.process = proc
        member.address = await asyncio.to_thread(proc.wait_ready, self.ready_timeout)

    async def stop(self, name: str) -> None:
        """Graceful stop (drain, deregister): SIGTERM for a process."""
        member = self.member(name)
        self.members.remove(member)
        self._stopped.append(member)
        await self._forget_channel(member.address)
        await self._stop(member)

    async def _forget_channel(self, address: str) -> None:
        """A channel to a stopped member would sit in reconnect backoff: a restart gets a fresh one."""
        channel = self._channels.pop(address, None)
        if channel is not None:
            await channel.close()

    async def kill(self, name: str) -> None:
        """No goodbye: SIGKILL for a process; in-process, the server stops without draining."""
        member = self.member(name)
        self.members.remove(member)
        self._stopped.append(member)
        await self._forget_channel(member.address)
        if member.process is not None:
            await asyncio.to_thread(member.process.kill)
        elif member.runtime is not None and member.runtime.server is not None:
            await member.runtime.server.stop(0)
            await member.runtime.stop()

    async def restart(self, name: str) -> Member:
        """Starts a stopped or killed member again with the same settings (and pinned port)."""
        old = next(m for m in self._stopped if m.name == name)
        member = Member(old.name, old.role, "", old.settings, extra=old.extra)
        await self._start(member)
        self.members.append(member)
        return member

    async def _stop(self, member: Member) -> None:
        if member.process is not None:
            await asyncio.to_thread(member.process.terminate, self.grace_seconds + 10)
        elif member.runtime is not None:
            await member.runtime.stop()

    async def close(self) -> None:
        """Engines, routers, cache nodes, metadata (the `kvmesh up` order); then channels."""
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        for role in ("engine", "router", "cachenode", "metadata"):
            tier = self.of_role(role)
            await asyncio.gather(*(self._stop(m) for m in tier), return_exceptions=True)
            for m in tier:
                self.members.remove(m)
                self._stopped.append(m)
        self._leaked = reap([m.process for m in self._stopped if m.process is not None])

    def leaked_processes(self) -> list[str]:
        """Members whose process still ran after it was told to stop (found by `close`)."""
        return self._leaked


def reap(processes: Iterable[KvmeshProcess]) -> list[str]:
    """The leak check for processes already told to stop: names those still running, then kills
    and closes them all (the mesh and the `kvmesh` test fixture both end with it)."""
    processes = list(processes)
    leaked = [p.name for p in processes if p.running()]
    for p in processes:
        p.kill()
        p.close()
    return leaked


@contextlib.asynccontextmanager
async def mesh(
    *,
    mode: Mode = "local",
    metadata: int = 1,
    cachenodes: int = 0,
    routers: int = 0,
    engines: int = 0,
    metadata_backend: str = "memory://?sweep_ms=50",
    metadata_listen: str = "127.0.0.1:0",
    metadata_settings: Mapping[str, Any] | None = None,
    cachenode_settings: Mapping[str, Any] | None = None,
    router_settings: Mapping[str, Any] | None = None,
    engine_settings: Mapping[str, Any] | None = None,
    cachenode_extra: Mapping[str, Any] | None = None,
    router_extra: Mapping[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
    grace_seconds: float = 0.5,
    ready_timeout: float = 30.0,
    wait_registered: bool = True,
    timeout: float | None = 120.0,
    leak_timeout: float = 5.0,
) -> AsyncIterator[MeshHandle]:
    """A whole mesh for one block; see the module docstring. `*_extra` go to in-process service
    constructors (e.g. `cachenode_extra={"storage": obj}`), `*_settings` to every member of a role,
    `names` are member-id formats per role (`{"cachenode": "node{i}"}`)."""
    _track_tasks(asyncio.get_running_loop())
    handle = MeshHandle(mode, grace_seconds, ready_timeout, names)
    try:
        # The hard limit covers start-up and the block; None for fixtures, whose setup and
        # teardown run in other tasks than the test (pytest-timeout bounds those).
        async with asyncio.timeout(timeout) if timeout is not None else contextlib.nullcontext():
            for _ in range(metadata):
                await handle.add("metadata", name="metadata" if metadata == 1 else None,
                                 listen=metadata_listen, backend=metadata_backend, **dict(metadata_settings or {}))
            for _ in range(cachenodes):
                await handle.add("cachenode", extra=dict(cachenode_extra or {}), **dict(cachenode_settings or {}))
            for _ in range(routers):
                await handle.add("router", extra=dict(router_extra or {}), **dict(router_settings or {}))
            for _ in range(engines):
                await handle.add("engine", **dict(engine_settings or {}))
            if wait_registered and metadata:
                if (router_settings or {}).get("register_self") is False:
                    routers = 0
                for role, count in (("cachenode", cachenodes), ("router", routers), ("engine", engines)):
                    if count:
                        await handle.wait_members(role, count, timeout=ready_timeout)
            yield handle
    finally:
        await handle.close()
        leaked = handle.leaked_processes()
        await _wait_tasks(handle, leak_timeout)
    assert not leaked, f"processes still running after the mesh stopped: {leaked}"


async def _wait_tasks(handle: MeshHandle, timeout: float) -> None:
    """Waits for the members' tasks to finish after they stopped; fails naming those that do not."""
    def leftover() -> list[asyncio.Task[Any]]:
        return [t for t in list(handle.tasks) if not t.done()]

    with contextlib.suppress(TimeoutError):
        await eventually(lambda: not leftover(), timeout=timeout, what="tasks to finish")
    left = leftover()
    for t in left:
        t.cancel()
    assert not left, f"tasks still running after the mesh stopped: {sorted(t.get_name() for t in left)}"


def local_mesh(**kw: Any) -> contextlib.AbstractAsyncContextManager[MeshHandle]:
    """Every member in this process, on this event loop (`ServerRuntime`s)."""
    return mesh(mode="local", **kw)


def process_mesh(**kw: Any) -> contextlib.AbstractAsyncContextManager[MeshHandle]:
    """Every member as a real `kvmesh` process (the console script's entry point)."""
    return mesh(mode="processes", **kw)
