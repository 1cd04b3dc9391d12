"""The `ssl` contexts for asyncio servers and clients (the bulk data plane and the Envoy picker use
them): mutual TLS, refusals, and rotation on disk picked up by new connections."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator

import pytest
from cryptography import x509

from kvmesh.security.tls import TLSFiles, client_ssl_context, server_ssl_context
from kvmesh.tools.certs import Issued, issue, make_ca
from tests.security.conftest import Pki


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1024):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def _server(files: TLSFiles) -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0, ssl=server_ssl_context(files))
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _client_files(pki: Pki, issued: Issued | None) -> TLSFiles:
    return TLSFiles(tls_cert=issued.cert if issued else None, tls_key=issued.key if issued else None,
                    tls_ca=pki.ca.cert_path)


async def _connect(port: int, files: TLSFiles) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=client_ssl_context(files), server_hostname="localhost"), 5)
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return reader, writer, x509.load_der_x509_certificate(der).serial_number


async def _round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def test_mutual_tls_rotation_and_refusals(pki: Pki) -> None:
    first = pki.issue("cachenode-0")
    server_files = TLSFiles(tls_cert=first.cert, tls_key=first.key, tls_ca=pki.ca.cert_path)
    client = _client_files(pki, pki.issue("engine-0"))
    async with _server(server_files) as port:
        reader, writer, serial = await _connect(port, client)
        assert serial == first.serial
        assert await _round_trip(reader, writer, b"hello") == b"hello"

        second = pki.issue("cachenode-0")  # rotated on disk
        r2, w2, serial2 = await _connect(port, client)
        assert serial2 == second.serial  # a new connection: the new certificate
        assert await _round_trip(r2, w2, b"new") == b"new"
        assert await _round_trip(reader, writer, b"old still works") == b"old still works"
        w2.close()

        # Refused: a client certificate from another CA, an expired one, none at all.
        other = make_ca(pki.directory / "other", "another CA")
        import datetime as dt

        now = dt.datetime.now(dt.UTC)
        refused = {
            "foreign": _client_files(pki, issue(other, "engine-0", pki.directory / "other")),
            "expired": _client_files(pki, pki.issue("old", not_before=now - dt.timedelta(days=9),
                                                    not_after=now - dt.timedelta(days=1))),
            "none": _client_files(pki, None),
        }
        for what, files in refused.items():
            with pytest.raises((ssl.SSLError, ConnectionError, asyncio.IncompleteReadError)):
                r, w, _ = await _connect(port, files)
                # TLS 1.3: the client's handshake ends before the server checked its certificate;
                # the refusal arrives on the first read.
                await _round_trip(r, w, b"x")
            assert await _round_trip(reader, writer, what.encode()) == what.encode()
        writer.close()


async def test_a_half_written_rotation_keeps_the_previous_pair(pki: Pki) -> None:
    first = pki.issue("cachenode-0")
    files = TLSFiles(tls_cert=first.cert, tls_key=first.key, tls_ca=pki.ca.cert_path)
    client = _client_files(pki, pki.issue("engine-0"))
    async with _server(files) as port:
        other = pki.issue("someone-else")
        first.key.write_bytes(other.key.read_bytes())  # the new key landed, its certificate not yet
        _, writer, serial = await _connect(port, client)
        assert serial == first.serial  # still the previous (matching) pair
        writer.close()
