"""`etcd://host:port[,host:port]?prefix=/kvmesh`: stateless replicas over etcd, through etcd3gw.

The model maps one to one: leases are etcd leases (etcd expires them and deletes their
keys itself, so LEAVE comes from etcd, not from a replica), compare-and-swap is one etcd
transaction, watches are etcd watches with `start_revision` and `prev_kv`, and revisions
are etcd's. etcd3gw talks to etcd's JSON gateway with `requests`, which blocks: every call
runs in this store's own thread pool, and each watch stream is read by a thread of its own
that hands events to the event loop. Needs etcd >= 3.4 (the `/v3/` gateway).

URI parameters: `prefix` (default /kvmesh), `timeout` seconds per call (default 5),
`threads` (default 32), `watch_buffer_bytes` (changes one watch may have waiting for its
reader, default 64MiB: a reader further behind is cut off and resumes). History is etcd's
own, bounded by etcd's compaction (`--auto-compaction-retention`) and `--quota-backend-bytes`.
TLS (`etcds://`, or any of these set): `ca` (CA bundle), `cert` and `key`
(client certificate, for etcd's `--client-cert-auth`), `check_hostname` (default true).
Authentication (etcd `auth enable`): `etcds://user:password@host:port` or `?user=NAME&password_file=PATH`;
the gateway does not take the certificate's CN as the user, so a password is needed. Lease ids are
etcd's own (etcd chooses them; see docs/security.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import ssl
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import etcd3gw
import requests
from etcd3gw import exceptions as etcd_exc
from requests.adapters import HTTPAdapter

from kvmesh.runtime.errors import Unavailable
from kvmesh.services.metadata.stores.base import Change, Compacted, Entry, LeaseNotFound, Store, prefix_end
from kvmesh.services.metadata.stores.etcd_transport import LeanSession
from kvmesh.uri import Uri, UriError

log = logging.getLogger("kvmesh.metadata.etcd")

T = TypeVar("T")


def _b64(data: str | bytes) -> str:
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(data: str | None) -> bytes:
    return base64.b64decode(data) if data else b""


class EtcdStore(Store):
    def __init__(self, hosts: list[tuple[str, int]], prefix: str, timeout: float, threads: int,
                 tls: EtcdTLS | None = None, credentials: tuple[str, str] | None = None,
                 watch_buffer_bytes: int = 64 * 1024**2) -> None:
        self._watch_buffer_bytes = watch_buffer_bytes
        self._hosts = hosts
        self._prefix = prefix.rstrip("/") + "/"
        self._timeout = timeout
        self._credentials = credentials
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kvmesh-etcd")
        # Calls go through a lean keep-alive transport (see etcd_transport); watches, which
        # stream, through a requests session.
        self._watch_session = requests.Session()
        protocol = "https" if tls is not None else "http"
        self._watch_session.mount(f"{protocol}://",
                                  HTTPAdapter(pool_connections=len(hosts), pool_maxsize=threads))
        # Per request, not on the session: requests lets REQUESTS_CA_BUNDLE override a session's verify.
        self._watch_tls: dict[str, Any] = {}
        if tls is not None:
            self._watch_tls["verify"] = tls.ca or True
            if tls.cert and tls.key:
                self._watch_tls["cert"] = (tls.cert, tls.key)
        self._lean = LeanSession(timeout, tls.context() if tls is not None else None)
        self._clients = [
            etcd3gw.client(host=h, port=p, timeout=timeout, api_path="/v3/", session=self._lean,  # type: ignore[arg-type]
                           protocol=protocol)
            for h, p in hosts
        ]
        self._current = 0
        self._watch_threads: set[threading.Thread] = set()

    @classmethod
    async def create(cls, uri: Uri) -> EtcdStore:
        hosts = [(h or "127.0.0.1", p or 2379) for h, p in uri.hosts] or [("127.0.0.1", 2379)]
        prefix = uri.param("prefix", uri.path or "/kvmesh") or "/kvmesh"
        if not prefix.startswith("/"):
            raise UriError(f"{uri.redacted()}: prefix must start with '/'")
        timeout = uri.float_param("timeout", 5.0)
        threads = uri.int_param("threads", 32)
        buffer = uri.size_param("watch_buffer_bytes", 64 * 1024**2)
        if timeout <= 0 or not 1 <= threads <= 1024 or buffer < 1024:
            raise UriError(f"{uri.redacted()}: timeout must be > 0, threads in 1..1024, watch_buffer_bytes >= 1KiB")
        tls = EtcdTLS.from_uri(uri)
        credentials = _credentials(uri)
        store = cls(hosts, prefix, timeout, threads, tls, credentials, buffer)
        if credentials is not None:
            try:
                await store._call("/auth/authenticate", {}, authenticate=True)
            except BaseException:
                await store.close()
                raise
        return store

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._watch_session.close()

    # -- plumbing ------------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> Any:
        """One gateway call, trying the next endpoint when one is unreachable (runs in a thread)."""
        last: Exception | None = None
        for _ in range(len(self._clients)):
            client = self._clients[self._current % len(self._clients)]
            try:
                return client.post(client.get_url(path), json=body)
            except (etcd_exc.ConnectionFailedError, etcd_exc.ConnectionTimeoutError) as exc:
                last = exc
                self._current += 1
        raise Unavailable(f"etcd unreachable: {last}")

    def _authenticate(self) -> None:
        """Logs in as the URI's user; the token goes with every later call (runs in a thread)."""
        assert self._credentials is not None
        user, password = self._credentials
        self._lean.headers.pop("Authorization", None)
        self._watch_session.headers.pop("Authorization", None)
        token = str(self._post("/auth/authenticate", {"name": user, "password": password})["token"])
        self._lean.headers["Authorization"] = token
        self._watch_session.headers["Authorization"] = token

    def _post_authenticated(self, path: str, body: dict[str, Any]) -> Any:
        """`_post`, logging in again once when etcd says the token expired (its TTL is 5 min idle)."""
        try:
            return self._post(path, body)
        except etcd_exc.Etcd3Exception as exc:
            if self._credentials is None or "auth token" not in (exc.detail_text or str(exc)).lower():
                raise
        self._authenticate()
        return self._post(path, body)

    async def _call(self, path: str, body: dict[str, Any], lease_id: int = 0, authenticate: bool = False) -> Any:
        loop = asyncio.get_running_loop()
        try:
            if authenticate:
                return await loop.run_in_executor(self._executor, self._authenticate)
            return await loop.run_in_executor(self._executor, self._post_authenticated, path, body)
        except etcd_exc.Etcd3Exception as exc:
            detail = (exc.detail_text or str(exc)).lower()
            if "authentication failed" in detail or "permission denied" in detail:
                raise Unavailable(f"etcd refused kvmesh's credentials: {exc.detail_text or exc}") from None
            if "lease not found" in detail:
                raise LeaseNotFound(lease_id or int(body.get("ID") or body.get("lease") or 0)) from None
            if "compacted" in detail:
                raise Compacted(detail) from None
            raise Unavailable(f"etcd error: {exc.detail_text or exc}") from None
        except RuntimeError as exc:  # executor shut down
            raise Unavailable(str(exc)) from None

    def _full(self, key: str) -> str:
        return self._prefix + key

    def _entry(self, kv: dict[str, Any]) -> Entry:
        return Entry(
            key=_unb64(kv["key"]).decode()[len(self._prefix) :],
            value=_unb64(kv.get("value")),
            mod_revision=int(kv.get("mod_revision", 0)),
            create_revision=int(kv.get("create_revision", 0)),
            lease_id=int(kv.get("lease", 0)),
        )

    @staticmethod
    def _rev(resp: dict[str, Any]) -> int:
        return int(resp.get("header", {}).get("revision", 0))

    async def ping(self) -> None:
        await self.revision()

    # -- leases --------------------------------------------------------------------------
    async def grant(self, ttl_seconds: int) -> tuple[int, int]:
        resp = await self._call("/lease/grant", {"TTL": ttl_seconds, "ID": 0})
        if resp.get("error"):
            raise Unavailable(f"etcd refused the lease: {resp['error']}")
        return int(resp["ID"]), int(resp.get("TTL", ttl_seconds))

    async def refresh(self, lease_id: int) -> int:
        resp = await self._call("/lease/keepalive", {"ID": lease_id})
        ttl = int(resp.get("result", {}).get("TTL", -1))
        if ttl <= 0:
            raise LeaseNotFound(lease_id)
        return ttl

    async def revoke(self, lease_id: int) -> int:
        resp = await self._call("/kv/lease/revoke", {"ID": lease_id})
        return self._rev(resp)

    # -- keys ----------------------------------------------------------------------------
    async def get(self, key: str) -> Entry | None:
        resp = await self._call("/kv/range", {"key": _b64(self._full(key))})
        kvs = resp.get("kvs") or []
        return self._entry(kvs[0]) if kvs else None

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        resp = await self._call("/kv/put", {"key": _b64(self._full(key)), "value": _b64(value), "lease": lease_id})
        return self._rev(resp)

    async def delete(self, key: str) -> tuple[bool, int]:
        resp = await self._call("/kv/deleterange", {"key": _b64(self._full(key))})
        return int(resp.get("deleted", 0)) > 0, self._rev(resp)

    def _range_body(self, prefix: str) -> dict[str, Any]:
        full = self._full(prefix)
        return {"key": _b64(full), "range_end": _b64(prefix_end(full))}

    async def range(self, prefix: str, limit: int = 0) -> tuple[list[Entry], int]:
        body = self._range_body(prefix)
        if limit:
            body["limit"] = limit
        resp = await self._call("/kv/range", body)
        return [self._entry(kv) for kv in resp.get("kvs") or []], self._rev(resp)

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease_id: int = 0
    ) -> tuple[bool, int, Entry | None]:
        k = _b64(self._full(key))
        txn = {
            "compare": [{"key": k, "result": "EQUAL", "target": "MOD", "mod_revision": expected_mod_revision}],
            "success": [
                {"request_put": {"key": k, "value": _b64(value), "lease": lease_id}},
                {"request_range": {"key": k}},
            ],
            "failure": [{"request_range": {"key": k}}],
        }
        resp = await self._call("/kv/txn", txn, lease_id)
        ok = bool(resp.get("succeeded"))
        kvs = (resp.get("responses") or [{}])[-1].get("response_range", {}).get("kvs") or []
        return ok, self._rev(resp), self._entry(kvs[0]) if kvs else None

    async def revision(self) -> int:
        resp = await self._call("/kv/range", {"key": _b64(self._prefix), "keys_only": True, "limit": 1})
        return self._rev(resp)

    # -- watch ---------------------------------------------------------------------------
    def _change(self, event: dict[str, Any]) -> Change:
        kv = event["kv"]
        key = _unb64(kv["key"]).decode()[len(self._prefix) :]
        revision = int(kv.get("mod_revision", 0))
        if event.get("type") == "DELETE":
            prev = event.get("prev_kv") or {}
            return Change("delete", key, _unb64(prev.get("value")), revision, lease_id=int(prev.get("lease", 0)))
        return Change("put", key, _unb64(kv.get("value")), revision,
                      created=int(kv.get("version", 0)) == 1, lease_id=int(kv.get("lease", 0)))

    def _read_watch(self, body: dict[str, Any], deliver: Callable[[object], None],
                    opened: list[requests.Response], stop: threading.Event) -> None:
        """Thread body: reads one etcd watch stream, handing each batch of changes to the loop."""
        import json

        client = self._clients[self._current % len(self._clients)]
        try:
            resp = self._watch_session.post(client.get_url("/watch"), json=body, stream=True,
                                            timeout=(self._timeout, None), **self._watch_tls)
            opened.append(resp)
            if stop.is_set():  # the watch was closed while this thread was connecting
                _shutdown(resp)
                return
            for line in _lines(resp.iter_content(chunk_size=None)):
                if stop.is_set():  # closed, or cut off for falling behind
                    return
                result = json.loads(line).get("result") or {}
                if int(result.get("compact_revision", 0) or 0) > 0:
                    deliver(Compacted(f"etcd compacted through {result['compact_revision']}"))
                    return
                if result.get("canceled"):
                    deliver(Unavailable(f"etcd cancelled the watch: {result.get('cancel_reason', '')}"))
                    return
                events = result.get("events")
                if events:
                    deliver([self._change(e) for e in events])
            deliver(Unavailable("etcd watch stream ended"))
        except Exception as exc:
            if not stop.is_set():
                deliver(Unavailable(f"etcd watch failed: {exc}"))

    async def watch(self, prefix: str, after_revision: int) -> AsyncGenerator[Change, None]:
        current = await self.revision()
        if after_revision > current:
            raise Compacted(f"revision {after_revision} is ahead of etcd's {current}")
        if after_revision < current:  # events after it must still be in etcd's history
            await self._call("/kv/range", {**self._range_body(prefix), "revision": after_revision + 1,
                                           "keys_only": True, "limit": 1})
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        stop = threading.Event()
        opened: list[requests.Response] = []
        waiting = [0]  # bytes of changes queued and not yet read (updated under `lock`)
        lock = threading.Lock()

        def size(item: object) -> int:
            return sum(len(c.key) + len(c.value) + 128 for c in item) if isinstance(item, list) else 0

        def deliver(item: object) -> None:
            with lock:
                waiting[0] += size(item)
                behind = waiting[0] > self._watch_buffer_bytes
            if behind:
                item = Unavailable("watch fell behind; resume from the last revision")
                stop.set()
            with contextlib.suppress(RuntimeError):  # the loop closed
                loop.call_soon_threadsafe(queue.put_nowait, item)

        body = {"create_request": {**self._range_body(prefix), "start_revision": after_revision + 1,
                                   "prev_kv": True}}
        thread = threading.Thread(target=self._read_watch, args=(body, deliver, opened, stop),
                                  name="kvmesh-etcd-watch", daemon=True)
        thread.start()
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                with lock:
                    waiting[0] -= size(item)
                for change in item:  # type: ignore[attr-defined]
                    yield change
        finally:
            stop.set()
            for resp in opened:
                _shutdown(resp)


@dataclass(frozen=True)
class EtcdTLS:
    """TLS to etcd (`etcds://`, or `etcd://...?ca=`): CA bundle, client certificate and key."""

    ca: str | None
    cert: str | None
    key: str | None
    check_hostname: bool

    @classmethod
    def from_uri(cls, uri: Uri) -> EtcdTLS | None:
        ca, cert, key = uri.param("ca"), uri.param("cert"), uri.param("key")
        if uri.scheme != "etcds" and not (ca or cert):
            return None
        if bool(cert) != bool(key):
            raise UriError(f"{uri.redacted()}: cert and key go together")
        return cls(ca, cert, key, uri.bool_param("check_hostname", True))

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.check_hostname = self.check_hostname
        if self.cert and self.key:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


def _credentials(uri: Uri) -> tuple[str, str] | None:
    """etcd's user and password: `etcd://user:password@...` or `?user=...&password_file=...`."""
    user = uri.username or uri.param("user")
    if not user:
        return None
    password = uri.password
    path = uri.param("password_file")
    if path:
        try:
            password = Path(path).read_text().strip()
        except OSError as exc:
            raise UriError(f"{uri.redacted()}: cannot read password_file: {exc}") from None
    if password is None:
        raise UriError(f"{uri.redacted()}: etcd user {user!r} needs a password (or password_file)")
    return user, password


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Newline-delimited JSON messages from the gateway's chunked stream."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line.strip())
    if pending.strip():
        yield pending


def _shutdown(resp: requests.Response) -> None:
    """Unblocks the thread reading a streaming response (closing alone does not wake a recv)."""
    with contextlib.suppress(Exception):
        sock = resp.raw.connection.sock
        sock.shutdown(socket.SHUT_RDWR)
    with contextlib.suppress(Exception):
        resp.close()
