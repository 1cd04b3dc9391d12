"""`kvmesh health` (the image's HEALTHCHECK) against a real gRPC server with the runtime's health service."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import grpc
import pytest

from kvmesh.runtime.server import ServerRuntime, Service
from kvmesh.settings import ServiceSettings
from kvmesh.tools.certs import issue, make_ca
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


async def test_health_speaks_mutual_tls_from_the_container_env(tmp_path: Path) -> None:
    """A service on mutual TLS with a policy: the probe dials with the files in KVMESH_TLS_* (as a
    container or pod running it as an exec probe has them) and is refused in plaintext."""
    ca = make_ca(tmp_path, "probe CA")
    own = issue(ca, "probe", tmp_path)
    policy = tmp_path / "policy.yaml"
    policy.write_text("principals: {}\n")
    port = free_port()
    tls = {"tls_cert": own.cert, "tls_key": own.key, "tls_ca": ca.cert_path, "security_policy": policy}
    runtime = ServerRuntime(_Empty(), ServiceSettings.model_validate({"listen": f"127.0.0.1:{port}", **tls}))
    await runtime.start()
    try:
        env = {"KVMESH_LISTEN": f"0.0.0.0:{port}", "KVMESH_TLS_CA": str(ca.cert_path),
               "KVMESH_TLS_CERT": str(own.cert), "KVMESH_TLS_KEY": str(own.key)}
        code, out = await _health(env=env)
        assert code == 0 and "SERVING" in out, out
        code, out = await _health("--timeout", "2", env={"KVMESH_LISTEN": f"0.0.0.0:{port}"})
        assert code == 1 and "SERVING" not in out.replace("NOT_SERVING", ""), out
    finally:
        await runtime.stop()
