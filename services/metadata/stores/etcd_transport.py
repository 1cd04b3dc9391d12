"""A lean HTTP/1.1 transport for etcd3gw: one persistent socket per worker thread.

etcd3gw takes any `requests.Session`-like object. `requests` cost about 0.9 ms of CPU per
call here (hooks, adapters, cookie jars, urllib3 pools, email-style header parsing);
this transport sends each call as one `sendall` on a keep-alive socket (TCP_NODELAY) and
parses only what the etcd gateway sends back (Content-Length or chunked bodies), which
matters when 1,000 members renew their leases every second. With an `ssl.SSLContext` the
sockets speak TLS (etcd's https client URLs). Errors are raised as
`requests` exceptions so etcd3gw maps them exactly as it does its own.
"""

from __future__ import annotations

import json as jsonlib
import socket
import ssl
import threading
from typing import Any
from urllib.parse import urlsplit

import requests

MAX_HEADER_BYTES = 64 * 1024


class LeanResponse:
    """The part of `requests.Response` etcd3gw reads."""

    def __init__(self, status: int, reason: str, body: bytes) -> None:
        self.status_code = status
        self.reason = reason
        self.content = body

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return jsonlib.loads(self.content)


class _Connection:
    """One keep-alive HTTP/1.1 connection; used by one thread at a time."""

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self.host_header = f"{host}:{port}".encode()
        raw = socket.create_connection((host, port), timeout=timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = tls.wrap_socket(raw, server_hostname=host) if tls is not None else raw
        except BaseException:
            raw.close()
            raise
        self.buffer = b""
        self.reusable = True

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionResetError("etcd closed the connection")
        self.buffer += data

    def _take(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._fill()
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            if len(self.buffer) > MAX_HEADER_BYTES:
                raise ConnectionError("malformed HTTP response from etcd")
            self._fill()
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def post(self, path: str, body: bytes, extra_headers: bytes = b"") -> LeanResponse:
        self.sock.sendall(
            b"POST " + path.encode() + b" HTTP/1.1\r\nHost: " + self.host_header + extra_headers
            + b"\r\nContent-Type: application/json\r\nContent-Length: " + str(len(body)).encode()
            + b"\r\n\r\n" + body
        )
        status_line = self._line()
        try:
            _, code, *reason = status_line.split(b" ", 2)
            status = int(code)
        except ValueError:
            raise ConnectionError(f"malformed HTTP status line from etcd: {status_line[:80]!r}") from None
        headers: dict[bytes, bytes] = {}
        while line := self._line():
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if headers.get(b"connection", b"").lower() == b"close":
            self.reusable = False
        if b"content-length" in headers:
            data = self._take(int(headers[b"content-length"]))
        elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            parts = []
            while size := int(self._line().split(b";", 1)[0], 16):
                parts.append(self._take(size))
                self._take(2)  # CRLF after each chunk
            while self._line():  # trailers, then the blank line
                pass
            data = b"".join(parts)
        else:  # body runs to the end of the connection
            self.reusable = False
            try:
                while True:
                    self._fill()
            except ConnectionResetError:
                pass
            data, self.buffer = self.buffer, b""
        return LeanResponse(status, reason[0].decode(errors="replace") if reason else "", data)


class LeanSession:
    """`post(url, json=..., timeout=...)` over thread-local keep-alive connections."""

    def __init__(self, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        self._timeout = timeout
        self._tls = tls
        self._local = threading.local()
        # Sent with every call (etcd's `Authorization: <token>` once authenticated).
        self.headers: dict[str, str] = {}

    def _pool(self) -> dict[tuple[str, int], _Connection]:
        pool: dict[tuple[str, int], _Connection] = self._local.__dict__.setdefault("pool", {})
        return pool

    def post(self, url: str, json: Any = None, timeout: float | None = None, **_: Any) -> LeanResponse:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        body = jsonlib.dumps(json).encode()
        pool = self._pool()
        for attempt in range(2):  # a kept-alive connection the server closed: retry once on a fresh one
            fresh = (host, port) not in pool
            try:
                conn = pool.get((host, port)) or _Connection(host, port, timeout or self._timeout, self._tls)
                pool[(host, port)] = conn
                extra = b"".join(f"\r\n{k}: {v}".encode() for k, v in self.headers.items())
                response = conn.post(parts.path, body, extra)
                if not conn.reusable:
                    pool.pop((host, port)).close()
                return response
            except TimeoutError as exc:
                self._drop(pool, host, port)
                raise requests.exceptions.Timeout(str(exc)) from exc
            except (OSError, ValueError) as exc:
                self._drop(pool, host, port)
                if fresh or attempt == 1:
                    raise requests.exceptions.ConnectionError(str(exc)) from exc
        raise AssertionError("unreachable")

    @staticmethod
    def _drop(pool: dict[tuple[str, int], _Connection], host: str, port: int) -> None:
        conn = pool.pop((host, port), None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Closes this thread's connections (others close when their threads end)."""
        pool = self._pool()
        for conn in pool.values():
            conn.close()
        pool.clear()
