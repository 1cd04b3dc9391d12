"""`redis://`, `rediss://` (TLS) and `redis+cluster://` — Redis, ValKey or KeyDB as a cache tier.

redis-py's asyncio client with the hiredis parser (installed with `redis[hiredis]`, picked
automatically), a bounded connection pool, and non-transactional pipelines for batches: one
round trip per batch (per shard in cluster mode). Every operation retries connection and
timeout errors with full-jitter backoff until a deadline, then answers UNAVAILABLE.

URI: `redis://[user:password@]host:port/DB?max_connections=64&timeout=2&deadline=5&prefix=kvmesh:`
`rediss://...?ca=/path/ca.pem&verify=true&cert=...&key=...`,
`redis+cluster://h1:p1,h2:p2,h3:p3?...` (TLS in cluster mode: `tls=true`).
Keys are `prefix + <namespace length in bytes> + ':' + namespace + key`: the length prefix makes
the split unambiguous, so two namespaces never collide, whatever bytes they or the keys hold (a NUL
separator did not: `("a\\0x", "k")` and `("a", "x\\0k")` were one key).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvmesh.backoff import Backoff
from kvmesh.runtime.errors import ResourceExhausted, Unavailable
from kvmesh.services.cachenode.storage.base import Capabilities, Counters, Storage, StorageStats
from kvmesh.uri import Uri, UriError

T = TypeVar("T")

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def _tls_kwargs(uri: Uri) -> dict[str, Any]:
    verify = uri.bool_param("verify", True)
    return {
        "ssl": True,
        "ssl_ca_certs": uri.param("ca"),
        "ssl_certfile": uri.param("cert"),
        "ssl_keyfile": uri.param("key"),
        "ssl_cert_reqs": ssl.CERT_REQUIRED if verify else ssl.CERT_NONE,
        "ssl_check_hostname": verify and uri.bool_param("check_hostname", False),
    }


class RedisStorage(Storage):
    """One Redis server (or a primary behind a proxy)."""

    scheme = "redis"
    capabilities = Capabilities(batch=True, zero_copy=False, persistent=False, device_memory=False)

    def __init__(self, client: Any, uri: Uri, capacity: int) -> None:
        super().__init__()
        self._client = client
        self._uri = uri
        self._capacity = capacity
        self._prefix = (uri.param("prefix", "kvmesh:") or "").encode()
        self._deadline_s = uri.float_param("deadline", 5.0)
        self._backoff = Backoff(base_s=0.02, cap_s=1.0)
        self._counters = Counters()
        self._used_reported = 0
        self._closed = False

    @classmethod
    def _common_kwargs(cls, uri: Uri) -> dict[str, Any]:
        timeout = uri.float_param("timeout", 2.0)
        kwargs: dict[str, Any] = {
            "username": uri.username,
            "password": uri.password,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "max_connections": uri.int_param("max_connections", 64),
            "health_check_interval": 30,
        }
        if uri.scheme == "rediss" or uri.bool_param("tls", False):
            kwargs.update(_tls_kwargs(uri))
        return kwargs

    @classmethod
    async def create(cls, uri: Uri) -> Storage:
        if not uri.hosts:
            raise UriError(f"{uri.redacted()}: a host is needed, e.g. redis://127.0.0.1:6379/0")
        db_text = uri.path.strip("/") or "0"
        if not db_text.isdigit():
            raise UriError(f"{uri.redacted()}: the path must be a database number")
        kwargs = cls._common_kwargs(uri)
        # No retries inside redis-py (by default 3, with up to seconds of backoff): `_retry` owns
        # retrying, so `deadline=` bounds an operation, including the first connect.
        kwargs["retry"] = Retry(NoBackoff(), 0)
        client = aioredis.Redis(host=uri.host, port=uri.port or 6379, db=int(db_text), **kwargs)
        storage = cls(client, uri, uri.size_param("capacity", 0))
        await storage._connect()
        return storage

    async def _connect(self) -> None:
        """Checks the server answers (within the deadline) and learns its capacity."""
        try:
            info = await self._retry(lambda: self._client.info("memory"))
        except Unavailable:
            await self.close()
            raise
        if not self._capacity:
            self._capacity = int(info.get("maxmemory", 0) or 0)
        self._used_reported = int(info.get("used_memory", 0) or 0)

    @property
    def name(self) -> str:
        host = ",".join(f"{h}:{p}" for h, p in self._uri.hosts)
        return f"{self._uri.scheme}://{host}{self._uri.path}"

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def stats(self) -> StorageStats:
        return self._counters.stats(self.name, self._used_reported, self._capacity, 0)

    def _k(self, namespace: str, key: bytes) -> bytes:
        ns = namespace.encode()
        return b"%s%d:%s%s" % (self._prefix, len(ns), ns, key)

    async def _retry(self, op: Callable[[], Awaitable[T]]) -> T:
        """Runs `op`, retrying connection errors with full-jitter backoff until the deadline."""
        if self._closed:
            raise Unavailable("redis storage is closed")
        last: BaseException | None = None
        async for _ in self._backoff.attempts(self._deadline_s):
            try:
                return await op()
            except _RETRYABLE as exc:
                last = exc
            except OutOfMemoryError as exc:
                raise ResourceExhausted(f"{self.name} is out of memory: {exc}") from exc
        raise Unavailable(f"{self.name} unreachable within {self._deadline_s:.1f}s: {last}")

    async def put(self, namespace: str, key: bytes, value: bytes | memoryview, ttl_seconds: int = 0) -> None:
        await self._retry(lambda: self._client.set(self._k(namespace, key), bytes(value), ex=ttl_seconds or None))

    async def put_many(
        self, namespace: str, items: Sequence[tuple[bytes, bytes | memoryview]], ttl_seconds: int = 0
    ) -> None:
        if not items:
            return

        async def run() -> Any:
            pipe = self._client.pipeline(transaction=False)
            for key, value in items:
                pipe.set(self._k(namespace, key), bytes(value), ex=ttl_seconds or None)
            return await pipe.execute()

        await self._retry(run)

    async def get(self, namespace: str, key: bytes) -> bytes | None:
        value = await self._retry(lambda: self._client.get(self._k(namespace, key)))
        self._counters.count_reads([value])
        return value

    async def get_many(self, namespace: str, keys: Sequence[bytes]) -> list[bytes | None]:
        if not keys:
            return []

        async def run() -> list[bytes | None]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.get(self._k(namespace, key))
            return list(await pipe.execute())

        values = await self._retry(run)
        self._counters.count_reads(values)
        return values

    async def delete(self, namespace: str, key: bytes) -> bool:
        return bool(await self._retry(lambda: self._client.delete(self._k(namespace, key))))

    async def exists(self, namespace: str, keys: Sequence[bytes]) -> list[bool]:
        if not keys:
            return []

        async def run() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._k(namespace, key))
            return list(await pipe.execute())

        return [bool(n) for n in await self._retry(run)]

    async def refresh_stats(self) -> None:
        """Reads used memory from the server (reported in Stats); keeps the last figure if it is down."""
        with contextlib.suppress(Unavailable, RedisError):
            info = await self._retry(lambda: self._client.info("memory"))
            self._used_reported = int(info.get("used_memory", 0) or 0)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._client.aclose()


class RedisClusterStorage(RedisStorage):
    """A Redis Cluster: keys spread over shards by slot; batches pipelined per shard."""

    scheme = "redis+cluster"

    @classmethod
    async def create(cls, uri: Uri) -> Storage:
        if not uri.hosts:
            raise UriError(f"{uri.redacted()}: startup nodes are needed, e.g. redis+cluster://h1:7000,h2:7001")
        kwargs = cls._common_kwargs(uri)
        kwargs.pop("health_check_interval", None)
        nodes = [ClusterNode(host, port or 6379) for host, port in uri.hosts]
        client = RedisCluster(startup_nodes=nodes, require_full_coverage=True, **kwargs)
        storage = cls(client, uri, uri.size_param("capacity", 0))
        try:
            await storage._retry(client.initialize)
        except Unavailable:
            await storage.close()
            raise
        await storage._connect_cluster()
        return storage

    async def refresh_stats(self) -> None:
        with contextlib.suppress(Unavailable, RedisError):
            await self._connect_cluster()

    async def _connect_cluster(self) -> None:
        info = await self._retry(lambda: self._client.info("memory", target_nodes=RedisCluster.PRIMARIES))
        maxmem = used = 0
        for node_info in info.values() if isinstance(info, dict) else []:
            if isinstance(node_info, dict):
                maxmem += int(node_info.get("maxmemory", 0) or 0)
                used += int(node_info.get("used_memory", 0) or 0)
        if not self._capacity:
            self._capacity = maxmem
        self._used_reported = used
