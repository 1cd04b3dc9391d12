"""`redis://host:port/db?prefix=kvmesh`: stateless replicas over one Redis (redis.asyncio).

Every change is one Lua script (see `redis_scripts`), so writes, CAS and lease ends are
atomic, and each appends its events to a Redis Stream, the ordered change log that watches
read (XREAD BLOCK) and resume from (the entry id is the revision). A lease is an expiring
key, PEXPIREd by each heartbeat, so "alive" is Redis' own answer. Redis deletes an expired
key without telling anyone reliably (keyspace notifications are fire-and-forget), so each
replica also runs a sweeper: every `sweep_ms` one script ends the leases whose deadline (a
sorted set) has passed, deleting their keys and logging the LEAVE events. The sweep is
idempotent, so running it on every replica is safe and any survivor does it.

URI parameters: `prefix` (default kvmesh), `retain` (revisions kept for resume, default
10000), `retain_bytes` (bytes of keys and values the log may hold, default 64MiB),
`sweep_ms` (default 200), `timeout` seconds per call (default 5), `connections` (pool size
for calls, default 64), `password_file` (the ACL user's password, read from a file).
`rediss://` uses TLS: `ca`, `cert`, `key`, `verify` (default true), `check_hostname` (default
false). An ACL user goes in the URI: `rediss://kvmesh@host:6380/0?password_file=...&ca=...`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis import exceptions as redis_exc

from kvmesh.runtime.errors import Unavailable
from kvmesh.services.metadata.stores import redis_scripts as lua
from kvmesh.services.metadata.stores.base import (
    Change,
    Compacted,
    Entry,
    LeaseNotFound,
    Store,
    Sweeper,
    new_lease_id,
    prefix_end,
)
from kvmesh.tasks import cancel_and_wait
from kvmesh.uri import Uri, UriError

log = logging.getLogger("kvmesh.metadata.redis")

T = TypeVar("T")
MAX_SEQ = 2**64 - 1
DEFAULT_RETAIN_BYTES = 64 * 1024**2


def _password(uri: Uri) -> str | None:
    """The URI's password, or the content of `password_file=` (keeps it out of flags and `ps`)."""
    path = uri.param("password_file")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise UriError(f"{uri.redacted()}: cannot read password_file: {exc}") from None
    return uri.password


def _tls_kwargs(uri: Uri) -> dict[str, Any]:
    """rediss:// options: `ca` (CA bundle), `cert` and `key` (client certificate), `verify`
    (default true), `check_hostname` (default false: Redis is often dialled by IP)."""
    verify = uri.bool_param("verify", True)
    return {
        "ssl_ca_certs": uri.param("ca"),
        "ssl_certfile": uri.param("cert"),
        "ssl_keyfile": uri.param("key"),
        "ssl_cert_reqs": "required" if verify else "none",
        "ssl_check_hostname": verify and uri.bool_param("check_hostname", False),
    }


class RedisStore(Store):
    def __init__(self, client: aioredis.Redis, watch_client: aioredis.Redis, prefix: str, retain: int,
                 sweep_s: float, block_ms: int, retain_bytes: int = DEFAULT_RETAIN_BYTES) -> None:
        self._client = client
        self._watch_client = watch_client
        self._prefix = prefix
        self._retain = f"{retain}:{retain_bytes}"  # the scripts' ARGV[2]
        self._block_ms = block_ms
        self._scripts = {
            name: client.register_script(getattr(lua, name))
            for name in ("PUT", "CAS", "DELETE", "RANGE", "STATE", "GRANT", "REFRESH", "REVOKE", "SWEEP")
        }
        self._sweeper = Sweeper(self._sweep, sweep_s, "metadata-redis-sweeper")
        self._readers: set[asyncio.Task[None]] = set()

    @classmethod
    async def create(cls, uri: Uri) -> RedisStore:
        if len(uri.hosts) > 1:
            raise UriError(f"{uri.redacted()}: one Redis host expected (use a Redis with replication for HA)")
        path = uri.path.strip("/") or "0"
        if not path.isdigit():
            raise UriError(f"{uri.redacted()}: the path must be a database number, got {uri.path!r}")
        prefix = uri.param("prefix", "kvmesh") or "kvmesh"
        retain = uri.int_param("retain", 10_000)
        retain_bytes = uri.size_param("retain_bytes", DEFAULT_RETAIN_BYTES)
        if retain_bytes < 1024:
            raise UriError(f"{uri.redacted()}: retain_bytes must be >= 1KiB")
        sweep_ms = uri.int_param("sweep_ms", 200)
        timeout = uri.float_param("timeout", 5.0)
        if retain < 64 or not 1 <= sweep_ms <= 10_000 or timeout <= 0:
            raise UriError(f"{uri.redacted()}: retain must be >= 64, sweep_ms in 1..10000, timeout > 0")
        connections = uri.int_param("connections", 64)
        if not 1 <= connections <= 10_000:
            raise UriError(f"{uri.redacted()}: connections must be in 1..10000")
        common: dict[str, Any] = dict(
            host=uri.host or "127.0.0.1", port=uri.port or 6379, db=int(path), username=uri.username,
            password=_password(uri), socket_connect_timeout=timeout, timeout=timeout,
            connection_class=aioredis.SSLConnection if uri.scheme == "rediss" else aioredis.Connection,
        )
        if uri.scheme == "rediss":
            common.update(_tls_kwargs(uri))
        block_ms = 5000
        # Blocking pools: under a burst, callers wait for a connection instead of failing.
        client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
            **common, max_connections=connections, socket_timeout=timeout))
        # Each watch holds one connection in XREAD BLOCK.
        watch_client = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool(
            **common, max_connections=1024, socket_timeout=block_ms / 1000 + timeout))
        return cls(client, watch_client, prefix, retain, sweep_ms / 1000.0, block_ms, retain_bytes)

    async def start(self) -> None:
        self._sweeper.start()

    async def close(self) -> None:
        """Stops the sweeper and the watch readers first, then the pools they draw from.

        Both stops go through `cancel_and_wait`, which repeats a cancel that redis-py lost
        (see kvmesh.tasks): a single cancel here once left the sweeper looping and close()
        waiting forever.
        """
        await self._sweeper.stop()
        try:
            await cancel_and_wait(*self._readers)
        except Exception:
            log.warning("a watch reader failed", exc_info=True)
        await self._client.aclose()
        await self._watch_client.aclose()

    async def _guarded(self, op: Callable[[], Awaitable[T]]) -> T:
        try:
            return await op()
        except (redis_exc.ConnectionError, redis_exc.TimeoutError, redis_exc.BusyLoadingError, OSError) as exc:
            raise Unavailable(f"redis unreachable: {exc}") from None
        except redis_exc.RedisError as exc:
            raise Unavailable(f"redis error: {exc}") from None

    async def _run(self, name: str, *args: Any) -> Any:
        script = self._scripts[name]
        return await self._guarded(lambda: script(keys=[], args=[self._prefix, self._retain, *args]))

    async def _sweep(self) -> None:
        try:
            while await self._run("SWEEP", 256) >= 256:
                pass
        except Unavailable as exc:
            log.debug("lease sweep skipped: %s", exc)

    async def ping(self) -> None:
        await self._guarded(self._client.ping)

    # -- leases --------------------------------------------------------------------------
    async def grant(self, ttl_seconds: int) -> tuple[int, int]:
        while True:  # a taken id (1 in 2^63 per live lease) draws again
            lease_id = new_lease_id()
            if int(await self._run("GRANT", ttl_seconds * 1000, lease_id)):
                return lease_id, ttl_seconds

    async def refresh(self, lease_id: int) -> int:
        ttl_ms = int(await self._run("REFRESH", lease_id))
        if ttl_ms < 0:
            raise LeaseNotFound(lease_id)
        return ttl_ms // 1000

    async def revoke(self, lease_id: int) -> int:
        result = await self._run("REVOKE", lease_id)
        if int(result[0]) < 0:
            raise LeaseNotFound(lease_id)
        return int(result[1])

    # -- keys ----------------------------------------------------------------------------
    @staticmethod
    def _entry(key: str, v: bytes | None, m: bytes | None, c: bytes | None, lease: bytes | None) -> Entry | None:
        if v is None or m is None:
            return None
        return Entry(key, v, int(m), int(c or m), int(lease or 0))

    async def get(self, key: str) -> Entry | None:
        fields: list[Any] = await self._guarded(
            lambda: self._client.hmget(f"{self._prefix}:kv:{key}", ["v", "m", "c", "l"])
        )
        return self._entry(key, *fields)

    async def put(self, key: str, value: bytes, lease_id: int = 0) -> int:
        result = await self._run("PUT", key, value, lease_id)
        if int(result[0]) < 0:
            raise LeaseNotFound(lease_id)
        return int(result[1])

    async def delete(self, key: str) -> tuple[bool, int]:
        result = await self._run("DELETE", key)
        return bool(int(result[0])), int(result[1])

    async def range(self, prefix: str, limit: int = 0) -> tuple[list[Entry], int]:
        end = prefix_end(prefix)
        result = await self._run("RANGE", f"[{prefix}", f"({end}" if end else "+", limit)
        out: list[Entry] = []
        for i in range(1, len(result), 5):
            entry = self._entry(result[i].decode(), *result[i + 1 : i + 5])
            if entry is not None:
                out.append(entry)
        return out, int(result[0])

    async def compare_and_swap(
        self, key: str, expected_mod_revision: int, value: bytes, lease_id: int = 0
    ) -> tuple[bool, int, Entry | None]:
        result = await self._run("CAS", key, expected_mod_revision, value, lease_id)
        if int(result[0]) < 0:
            raise LeaseNotFound(lease_id)
        fields = (list(result[2:6]) + [None] * 4)[:4]
        return bool(int(result[0])), int(result[1]), self._entry(key, *fields)

    async def revision(self) -> int:
        return int((await self._run("STATE"))[0])

    # -- watch ---------------------------------------------------------------------------
    async def watch(self, prefix: str, after_revision: int) -> AsyncGenerator[Change, None]:
        current, compacted = (int(x) for x in await self._run("STATE"))
        if not compacted <= after_revision <= current:
            raise Compacted(f"revision {after_revision} is not retained (have {compacted}..{current})")
        # XREAD runs in a task of its own: cancelling a blocked XREAD from inside a gRPC
        # handler was seen to leave the handler hanging, while cancelling a queue wait is
        # always prompt. The reader also checks `stop` after every (bounded) XREAD.
        queue: asyncio.Queue[list[Change] | BaseException] = asyncio.Queue(maxsize=8)
        stop = asyncio.Event()
        reader = asyncio.create_task(self._read_log(prefix, after_revision, queue, stop), name="metadata-redis-watch")
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                for change in item:
                    yield change
        finally:
            stop.set()
            reader.cancel()

    async def _read_log(self, prefix: str, after_revision: int,
                        queue: asyncio.Queue[list[Change] | BaseException], stop: asyncio.Event) -> None:
        stream = f"{self._prefix}:log"
        last_id = f"{after_revision}-{MAX_SEQ}"
        try:
            while not stop.is_set():
                streams: dict[Any, Any] = {stream: last_id}
                reply: Any = await self._guarded(
                    lambda: self._watch_client.xread(streams, count=512, block=self._block_ms)  # noqa: B023
                )
                batch: list[Change] = []
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last_id = entry_id.decode()
                        key = fields[b"k"].decode()
                        if key.startswith(prefix):
                            batch.append(Change(
                                "put" if fields[b"t"] == b"p" else "delete",
                                key,
                                fields[b"v"],
                                int(last_id.split("-", 1)[0]),
                                created=fields[b"c"] == b"1",
                                lease_id=int(fields[b"l"]),
                            ))
                if batch:
                    await queue.put(batch)
        except Unavailable as exc:
            await queue.put(exc)
