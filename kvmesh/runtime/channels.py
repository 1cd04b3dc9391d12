"""gRPC client channels with the same message-size limits and keepalives as the servers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

from kvmesh.security.client import process_client_tls
from kvmesh.security.tls import ClientTLS
from kvmesh.telemetry import tracing_enabled

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        # Servers accept the clients' 10 s keepalive pings on streams that carry no data for long
        # (an Attach session whose calls go over the local control socket); the default (5 min)
        # answers the third such ping with GOAWAY "too_many_pings", ending the stream.
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.enable_retries", 0),
    ]


def open_channel(
    address: str,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    interceptors: Sequence[Any] | None = None,
    tls: ClientTLS | None = None,
) -> grpc.aio.Channel:
    """An aio channel to `host:port`: TLS with `tls`, else with this process's TLS settings
    (`kvmesh.security.client`), else plaintext.

    When this process exports traces (`--otlp-endpoint`), every channel gets the OpenTelemetry
    client interceptors, so calls between services show up as client spans.
    """
    chosen = list(interceptors or [])
    if tracing_enabled():
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        chosen.extend(aio_client_interceptors())
    tls = tls or process_client_tls()
    if tls is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                       options=channel_options(max_message_bytes) + tls.channel_options(),
                                       interceptors=chosen)
    return grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes), interceptors=chosen)
