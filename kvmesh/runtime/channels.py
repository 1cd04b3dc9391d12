"""gRPC client channels with the same message-size limits and keepalives as the servers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

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
) -> grpc.aio.Channel:
    """An insecure aio channel to `host:port` (mesh traffic stays inside the cluster network).

    When this process exports traces (`--otlp-endpoint`), every channel gets the OpenTelemetry
    client interceptors, so calls between services show up as client spans.
    """
    chosen = list(interceptors or [])
    if tracing_enabled():
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        chosen.extend(aio_client_interceptors())
    return grpc.aio.insecure_channel(address, options=channel_options(max_message_bytes), interceptors=chosen)
