"""Real servers for storage tests: Redis with TLS and a password, a 3-node Redis Cluster, vineyardd."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kvmesh.tools.testing.polling import eventually_sync
from kvmesh.tools.testing.ports import free_port, wait_port
from kvmesh.tools.testing.servers import start_redis

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Processes:
    """Server processes started by a fixture, stopped together."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def make_self_signed_cert(workdir: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1 made with openssl."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def redis_tls_server(workdir: Path, password: str) -> Iterator[tuple[int, Path]]:
    """redis-server speaking only TLS, with a password; yields (port, CA file)."""
    cert, key = make_self_signed_cert(workdir)
    port = free_port()
    handle = start_redis(
        workdir,
        port=free_port(),
        extra_args=[
            "--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--requirepass", password,
        ],
    )
    try:
        wait_port("127.0.0.1", port)
        yield port, cert
    finally:
        handle.stop()


def cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is valid and free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with contextlib.suppress(OSError), socket.socket() as probe:
                probe.bind(("127.0.0.1", port + 10000))
                return port


@contextlib.contextmanager
def redis_cluster(workdir: Path, nodes: int = 3) -> Iterator[list[int]]:
    """A real Redis Cluster of `nodes` primaries on free loopback ports; yields their ports."""
    group = Processes()
    ports = [cluster_port() for _ in range(nodes)]
    try:
        for port in ports:
            node_dir = workdir / f"node-{port}"
            node_dir.mkdir()
            group.procs.append(
                subprocess.Popen(
                    [
                        "redis-server", "--bind", "127.0.0.1", "--port", str(port), "--cluster-enabled", "yes",
                        "--cluster-config-file", str(node_dir / "nodes.conf"), "--save", "", "--appendonly", "no",
                        "--dir", str(node_dir),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        for port in ports:
            wait_port("127.0.0.1", port)
        subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        def cluster_ok() -> bool:
            states = [
                subprocess.run(["redis-cli", "-p", str(p), "cluster", "info"], capture_output=True, text=True).stdout
                for p in ports
            ]
            assert all("cluster_state:ok" in s for s in states), states
            return True

        eventually_sync(cluster_ok, timeout=30, interval=0.2, what="the redis cluster to become ok")
        yield ports
    finally:
        group.stop()


def vineyardd_binary() -> str:
    import vineyard.bdist

    return str(Path(vineyard.bdist.__file__).parent / "vineyardd")


@contextlib.contextmanager
def vineyardd(workdir: Path, size: str = "256Mi") -> Iterator[Path]:
    """A real vineyardd (the binary shipped in the vineyard wheel) on a private socket."""
    sock = workdir / "vineyard.sock"
    log = open(workdir / "vineyardd.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [vineyardd_binary(), "--socket", str(sock), "--meta", "local", "--size", size, "--rpc=false",
         "--logtostderr"],
        stdout=log,
        stderr=log,
        env={**os.environ, "GLOG_minloglevel": "2"},
    )
    try:
        def accepts() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"vineyardd exited: {(workdir / 'vineyardd.log').read_text()[-2000:]}")
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))  # OSError (no socket yet, refused): not yet
            return True

        eventually_sync(accepts, timeout=30, interval=0.1, what="vineyardd to accept connections", retry_on=OSError)
        yield sock
    finally:
        Processes([proc]).stop()
        log.close()
