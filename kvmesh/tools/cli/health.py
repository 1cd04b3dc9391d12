"""`kvmesh health`: one grpc.health.v1 Check, exit 0 when SERVING.

The container image's HEALTHCHECK and compose run it, and Kubernetes as an exec probe (the native
`grpc:` probe cannot speak TLS). With no `--address` it probes the service configured in the same
container: the port of `KVMESH_LISTEN` on loopback, so one HEALTHCHECK line serves every kvmesh
service. Over TLS it takes the tools' credentials (`--tls-ca`, `--tls-cert`, `--tls-key`, or the
same `KVMESH_TLS_*` variables the service in the container reads, so the probe presents the
service's own certificate where client certificates are required). Health itself needs no principal.
Exit codes: 0 serving, 1 not serving or unreachable, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from kvmesh.tools.cli.credentials import add_credential_arguments, credentials_from_args

if TYPE_CHECKING:
    import grpc

    from kvmesh.security.tls import ClientTLS

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")


def probe_address(listen: str) -> str:
    """The address to dial for a server listening on `listen` (a wildcard host means loopback)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT with a fixed port, got {listen!r}")
    if host in WILDCARD_HOSTS:
        host = "[::1]" if host in ("::", "[::]") else "127.0.0.1"
    return f"{host}:{port}"


def _channel(address: str, tls: ClientTLS | None) -> grpc.Channel:
    import grpc  # lazily: a probe runs often and should start fast

    if tls is None:
        return grpc.insecure_channel(address)
    return grpc.secure_channel(address, tls.channel_credentials(), options=tls.channel_options())


def check(address: str, service: str = "", timeout: float = 3.0, tls: ClientTLS | None = None) -> tuple[bool, str]:
    """One Health.Check call, over TLS with `tls`: (serving, status name or error)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with _channel(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            return False, f"{code.name if code else 'ERROR'}: {exc.details() if hasattr(exc, 'details') else exc}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=None,
        help="HOST:PORT to probe [default: the port of KVMESH_LISTEN on loopback]",
    )
    parser.add_argument("--service", default="", help="gRPC service name to check [default: the whole server]")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer [default: 3]")
    parser.add_argument("--quiet", action="store_true", help="print nothing, only set the exit code")
    add_credential_arguments(parser)


def run(args: argparse.Namespace) -> int:
    try:
        address = args.address or probe_address(os.environ.get("KVMESH_LISTEN", ""))
    except ValueError as exc:
        print(f"kvmesh health: {exc} (pass --address or set KVMESH_LISTEN)", file=sys.stderr)
        return 2
    if args.timeout <= 0:
        print("kvmesh health: --timeout must be positive", file=sys.stderr)
        return 2
    settings = credentials_from_args(args, "health")
    if settings is None:
        return 2
    from kvmesh.security.client import client_tls

    serving, detail = check(address, args.service, args.timeout, client_tls(settings))
    if not args.quiet:
        print(f"{address} {args.service or '(server)'}: {detail}")
    return 0 if serving else 1
