"""The router's second listener: Envoy's `ext_proc` endpoint picker, with gRPC health.

It shares the router's core (same tree, same pods, same in-flight load) but has its own gRPC
server, so its bounds (concurrent streams: one per HTTP request in flight; message size: the
buffered body) are the gateway's and do not change those of the `Router` API.

Security is the service's own: the listener speaks TLS with the router's `--tls-*` files (one
certificate, one CA, rotation, `--tls-require-client-cert` so Envoy presents a client
certificate), and with `--security-policy` every stream is authenticated by the same interceptor
and the gateway's principal must be allowed to route (`allows_route`). Health stays open, for
Envoy's and Kubernetes' probes.
"""

from __future__ import annotations

import logging

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from kvmesh.security.server import add_port, auth_interceptors
from kvmesh.services.router.access import RouterAccess
from kvmesh.services.router.core import RouterCore
from kvmesh.services.router.ext_proc.picker import ExtProcApi, PickerLimits
from kvmesh.services.router.settings import RouterSettings

log = logging.getLogger("kvmesh.router.ext_proc")

SERVICE_NAME = "envoy.service.ext_proc.v3.ExternalProcessor"
_ENVELOPE_BYTES = 64 * 1024  # headers and protobuf framing on top of the body


class ExtProcServer:
    """Serves `ExtProcApi` and `grpc.health.v1.Health` on `settings.ext_proc_listen`."""

    def __init__(self, core: RouterCore, settings: RouterSettings, access: RouterAccess | None = None) -> None:
        self.settings = settings
        self.api = ExtProcApi(core, PickerLimits(settings.ext_proc_max_body_bytes, settings.ext_proc_shed_inflight),
                              access or RouterAccess(settings.security_policy))
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> int:
        if self.server is not None:
            return self.port
        listen = self.settings.ext_proc_listen
        if not listen:
            raise ValueError("no --ext-proc-listen address")
        size = self.settings.ext_proc_max_body_bytes + _ENVELOPE_BYTES
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", size), ("grpc.max_send_message_length", size)],
            maximum_concurrent_rpcs=self.settings.ext_proc_max_streams,
            interceptors=auth_interceptors(self.settings),
        )
        ep_grpc.add_ExternalProcessorServicer_to_server(self.api, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = add_port(server, listen, self.settings)  # TLS with the service's --tls-* files when set
        if port == 0:
            raise OSError(f"cannot listen on {listen}")
        await server.start()
        self.server, self.port = server, port
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("ext_proc endpoint picker serving", extra={"address": f"{listen.rpartition(':')[0]}:{port}"})
        return port

    async def drain(self) -> None:
        """Readiness off: Envoy's health check stops sending new requests here."""
        await self.health.enter_graceful_shutdown()

    async def close(self, grace: float | None = None) -> None:
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(grace)
            self.server = None
