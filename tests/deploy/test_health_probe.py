"""`kvmesh health` (the image's HEALTHCHECK) against a real gRPC server with the runtime's health service."""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest

from kvmesh.runtime.server import ServerRuntime, Service
from kvmesh.settings import ServiceSettings
from kvmesh.tools.cli.health import probe_address
from kvmesh.tools.processes import kvmesh_env
from kvmesh.tools.testing.ports import free_port


class _Empty(Service):
    """A service with no RPCs of its own: the runtime still serves health and reflection."""

    name = "empty"

    def register(self, server: grpc.aio.Server) -> None:
        return None


async def _health(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "kvmesh", "health", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=kvmesh_env(env),
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return int(proc.returncode or 0), out.decode()


def test_probe_address_maps_wildcards_to_loopback() -> None:
    assert probe_address("0.0.0.0:7400") == "127.0.0.1:7400"
    assert probe_address("[::]:7500") == "[::1]:7500"
    assert probe_address("10.1.2.3:7600") == "10.1.2.3:7600"
    for bad in ("", "7400", "host:", "host:0", "host:http"):
        with pytest.raises(ValueError):
            probe_address(bad)


async def test_health_follows_serving_state() -> None:
    port = free_port()
    runtime = ServerRuntime(_Empty(), ServiceSettings.model_validate({"listen": f"127.0.0.1:{port}"}))
    await runtime.start()
    try:
        code, out = await _health("--address", f"127.0.0.1:{port}")
        assert code == 0 and "SERVING" in out, out
        # No --address: the port comes from KVMESH_LISTEN, as in the container.
        code, out = await _health(env={"KVMESH_LISTEN": f"0.0.0.0:{port}"})
        assert code == 0, out
        code, out = await _health("--address", f"127.0.0.1:{port}", "--service", "no.such.Service")
        assert code == 1 and "NOT_FOUND" in out, out
        await runtime.health.enter_graceful_shutdown()
        code, out = await _health("--address", f"127.0.0.1:{port}")
        assert code == 1 and "NOT_SERVING" in out, out
    finally:
        await runtime.stop()


async def test_health_unreachable_and_bad_arguments() -> None:
    code, out = await _health("--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert code == 1 and ("UNAVAILABLE" in out or "DEADLINE_EXCEEDED" in out), out
    code, out = await _health()  # neither --address nor KVMESH_LISTEN
    assert code == 2 and "KVMESH_LISTEN" in out, out
    code, out = await _health("--address", "127.0.0.1:1", "--timeout", "0")
    assert code == 2, out
