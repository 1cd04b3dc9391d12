"""The lean HTTP transport etcd3gw uses: framing variants, reuse, and errors as requests raises them."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from kvmesh.services.metadata.stores.etcd_transport import LeanSession

REPLIES = {
    b"/length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"a\": \"1\"}\n",
    b"/chunked": (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                  b"4\r\n{\"b\"\r\n5\r\n: \"2\"\r\n1\r\n}\r\n0\r\n\r\n"),
    b"/error": b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\nno",
    b"/close": b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n{\"c\": 3}",
}


@pytest.fixture
def server() -> Iterator[tuple[int, list[int]]]:
    """A tiny HTTP/1.1 server; counts connections so reuse can be checked."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[int] = []

    def handle(conn: socket.socket) -> None:
        buffer = b""
        with conn:
            while True:
                while b"\r\n\r\n" not in buffer:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buffer += data
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                                  if line.lower().startswith(b"content-length")))
                while len(buffer) < length:
                    buffer += conn.recv(65536)
                buffer = buffer[length:]
                path = head.split(b" ")[1]
                conn.sendall(REPLIES[path])
                if path == b"/close":
                    return

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            connections.append(1)
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1], connections
    listener.close()


def test_framings_and_connection_reuse(server: tuple[int, list[int]]) -> None:
    port, connections = server
    session = LeanSession(timeout=2)
    base = f"http://127.0.0.1:{port}"
    assert session.post(base + "/length", json={"x": 1}).json() == {"a": "1"}
    assert session.post(base + "/chunked", json={}).json() == {"b": "2"}
    error = session.post(base + "/error", json={})
    assert (error.status_code, error.reason, error.text) == (404, "Not Found", "no")
    assert len(connections) == 1  # all three on one kept-alive connection
    assert session.post(base + "/close", json={}).json() == {"c": 3}
    assert session.post(base + "/length", json={}).json() == {"a": "1"}
    assert len(connections) == 2  # the server closed it: a fresh one
    session.close()


def test_unreachable_is_a_requests_connection_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(requests.exceptions.ConnectionError):
        LeanSession(timeout=1).post(f"http://127.0.0.1:{port}/v3/kv/range", json={})
