"""What a gRPC server needs from the security settings: its port (TLS or not) and its interceptors."""

from __future__ import annotations

import logging

import grpc

from kvmesh.security.interceptor import AuthInterceptor
from kvmesh.security.policy import PolicyFile
from kvmesh.security.settings import SecuritySettings
from kvmesh.security.tls import grpc_server_credentials

log = logging.getLogger("kvmesh.security")


def add_port(server: grpc.aio.Server, listen: str, settings: SecuritySettings) -> int:
    """Binds `listen`: with TLS when --tls-cert is set (rotating credentials), else plaintext."""
    if settings.server_enabled:
        return int(server.add_secure_port(listen, grpc_server_credentials(settings)))
    return int(server.add_insecure_port(listen))


def auth_interceptors(settings: SecuritySettings) -> list[grpc.aio.ServerInterceptor]:
    """The authenticating interceptor when a policy is set (place it last: innermost)."""
    if settings.security_policy is None:
        return []
    if not settings.server_enabled:
        log.warning("--security-policy without --tls-cert: tokens would travel in clear text and no "
                    "client certificate can be checked")
    return [AuthInterceptor(PolicyFile(settings.security_policy))]
