"""Free loopback ports for servers started by tests and benchmarks."""

from __future__ import annotations

import socket

from kvmesh.tools.testing.polling import eventually_sync


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Waits until something accepts TCP connections on host:port."""
    def accepts() -> bool:
        with socket.create_connection((host, port), timeout=0.5):
            return True

    eventually_sync(accepts, timeout=timeout, interval=0.05, what=f"something to listen on {host}:{port}",
                    retry_on=OSError)
