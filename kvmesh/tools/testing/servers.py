"""Real etcd and Redis servers on free loopback ports.

With a Docker engine, testcontainers runs the official images; otherwise the local
`etcd` and `redis-server` binaries (Debian's etcd-server and redis-server) run in a
temporary directory. Either way the server listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.tools.testing.polling import eventually_sync
from kvmesh.tools.testing.ports import free_port, wait_port


def docker_available() -> bool:
    """True when a Docker engine answers (not merely when the CLI is installed)."""
    if os.environ.get("KVMESH_TEST_NO_DOCKER"):
        return False
    if not shutil.which("docker"):
        return False
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


@dataclass
class ServerHandle:
    """A running server: where it listens and how to stop it."""

    name: str
    host: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    workdir: Path | None = None
    extra_ports: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL, for failure tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def _need(binary: str, package: str) -> str:
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if Path(f"/usr/sbin/{binary}").exists() else None)
    if not path:
        raise RuntimeError(f"{binary} not found: install Debian's {package} (make install does)")
    return path


def start_redis(workdir: Path, port: int | None = None, extra_args: list[str] | None = None) -> ServerHandle:
    """redis-server on 127.0.0.1 with persistence off (restartable on the same port)."""
    port = port or free_port()
    args = [
        _need("redis-server", "redis-server"),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--protected-mode", "yes",
        *(extra_args or []),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=workdir)
    wait_port("127.0.0.1", port)
    return ServerHandle("redis", "127.0.0.1", port, proc, workdir)


def start_etcd(workdir: Path, port: int | None = None) -> ServerHandle:
    """A single-member etcd on 127.0.0.1 with its data in `workdir` (restartable on the same ports)."""
    port = port or free_port()
    peer = free_port()
    data = workdir / "etcd-data"
    args = [
        _need("etcd", "etcd-server"),
        "--name", "kvmesh-test",
        "--data-dir", str(data),
        "--listen-client-urls", f"http://127.0.0.1:{port}",
        "--advertise-client-urls", f"http://127.0.0.1:{port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"kvmesh-test=http://127.0.0.1:{peer}",
        "--log-level", "error",
    ]
    env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
    log = open(workdir / "etcd.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=workdir, env=env)
    wait_port("127.0.0.1", port, timeout=20)
    _wait_etcd_ready(port)
    return ServerHandle("etcd", "127.0.0.1", port, proc, workdir, [peer])


def _wait_etcd_ready(port: int, timeout: float = 20.0) -> None:
    import json
    import urllib.request

    def answers() -> bool:
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/v3/kv/range", data=json.dumps({"key": "AA=="}).encode(), method="POST"
        )
        with urllib.request.urlopen(req, timeout=1) as resp:
            return bool(resp.status == 200)

    eventually_sync(answers, timeout=timeout, interval=0.1, what="etcd to answer", retry_on=OSError)


@contextlib.contextmanager
def redis_server() -> Iterator[ServerHandle]:
    """A Redis for one test session: container when Docker runs, local binary otherwise."""
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as c:
            yield ServerHandle("redis", "127.0.0.1", int(c.get_exposed_port(6379)))
        return
    with tempfile.TemporaryDirectory(prefix="kvmesh-redis-") as tmp:
        handle = start_redis(Path(tmp))
        try:
            yield handle
        finally:
            handle.stop()


@contextlib.contextmanager
def etcd_server() -> Iterator[ServerHandle]:
    """An etcd for one test session: container when Docker runs, local binary otherwise."""
    if docker_available():
        from testcontainers.core.container import DockerContainer

        container = DockerContainer("quay.io/coreos/etcd:v3.5.15").with_exposed_ports(2379).with_command(
            "etcd --listen-client-urls http://0.0.0.0:2379 --advertise-client-urls http://127.0.0.1:2379"
        )
        with container as c:
            port = int(c.get_exposed_port(2379))
            wait_port("127.0.0.1", port, timeout=30)
            _wait_etcd_ready(port)
            yield ServerHandle("etcd", "127.0.0.1", port)
        return
    with tempfile.TemporaryDirectory(prefix="kvmesh-etcd-") as tmp:
        handle = start_etcd(Path(tmp))
        try:
            yield handle
        finally:
            handle.stop()
