"""The data-plane listener: accepts connections (plain TCP or TLS) and owns them until close.

TLS comes from the service's own settings (`--tls-cert`, `--tls-key`, `--tls-ca`,
`--tls-require-client-cert`: `kvmesh.security.tls.server_ssl_context`, rotating), so the data
plane and the gRPC port present the same certificate and accept the same clients. Who may do
what is the node's `TenantGate`, the same one gRPC asks."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable

from kvmesh.services.cachenode.dataplane.connection import DataConnection
from kvmesh.services.cachenode.dataplane.limits import DataPlaneLimits, InflightBudget
from kvmesh.services.cachenode.limits import Limits
from kvmesh.services.cachenode.storage.base import Storage
from kvmesh.services.cachenode.tenants import TenantGate

log = logging.getLogger("kvmesh.cachenode.dataplane")


class DataPlaneServer:
    """Serves the bulk data plane of one cache node over its storage."""

    def __init__(
        self,
        storage: Callable[[], Storage | None],
        limits: Limits,
        dp_limits: DataPlaneLimits,
        ssl_context: ssl.SSLContext | None = None,
        tenants: TenantGate | None = None,
    ) -> None:
        self._storage = storage
        self.tenants = tenants or TenantGate()
        self.limits = limits
        self.dp_limits = dp_limits
        self.budget = InflightBudget(dp_limits.max_inflight_bytes)
        self.ssl_context = ssl_context
        self.connections: set[DataConnection] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    @property
    def storage(self) -> Storage | None:
        return self._storage()

    async def start(self, host: str, port: int) -> int:
        """Listens on host:port (0: a free port); returns the bound port. Safe to call twice."""
        if self._server is not None:
            return self.port
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: DataConnection(self), host, port, ssl=self.ssl_context, backlog=256, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("data plane listening", extra={"host": host, "port": self.port, "tls": self.ssl_context is not None})
        return self.port

    def stop_accepting(self) -> None:
        """No new connections; the open ones go on (drain)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        """Cuts every connection (open writes are aborted, pins released) and stops listening."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in list(self.connections):
            connection.abort()
        if server is not None:
            await server.wait_closed()
        await asyncio.sleep(0)  # let connection_lost run for the aborted connections
