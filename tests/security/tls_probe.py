"""What a server presents: one TLS handshake with the `ssl` module, returning the served certificate."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

from cryptography import x509


def served_certificate(address: str, ca: Path, cert: Path | None = None, key: Path | None = None,
                       server_name: str = "localhost") -> x509.Certificate:
    """The certificate the server at `address` presents to a new connection (ALPN h2, like gRPC)."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.set_alpn_protocols(["h2"])
    if cert is not None and key is not None:
        ctx.load_cert_chain(cert, key)
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_name) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)
