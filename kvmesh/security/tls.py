"""TLS from PEM files: gRPC server and channel credentials, and `ssl` contexts for asyncio.

Every process takes the same four settings (`--tls-cert`, `--tls-key`, `--tls-ca`,
`--tls-require-client-cert`, env `KVMESH_TLS_*`): its certificate chain and key (presented as a
server and, for mutual TLS, as a client), and the CA bundle that peers' certificates must chain
to. Files are read again when they change (size, mtime or inode), so certificates rotate without
a restart: a server checks on every new connection and keeps serving established ones; a client
reads the current files for every new channel or connection. A cert/key pair that does not load
(a rotation half written) is skipped with a warning and the previous pair stays in use.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

log = logging.getLogger("kvmesh.security.tls")

Stamp = tuple[tuple[int, int, int], ...]


class TLSFiles(BaseSettings):
    """The TLS settings of a process (a server, a client, or both); composed into every service's settings."""

    model_config = SettingsConfigDict(env_prefix="KVMESH_", frozen=True, extra="ignore")

    tls_cert: Path | None = Field(
        None, description="PEM certificate chain this process presents (as server, and as client for mTLS); "
                          "turns TLS on for its listeners")
    tls_key: Path | None = Field(None, description="PEM private key of --tls-cert")
    tls_ca: Path | None = Field(
        None, description="PEM CA bundle peers' certificates must chain to; turns TLS on for outgoing channels")
    tls_require_client_cert: bool = Field(
        True, description="with TLS on, refuse clients without a certificate from --tls-ca (mutual TLS)")
    tls_server_name: str | None = Field(
        None, description="name expected in servers' certificates (default: the host dialled)")

    @model_validator(mode="after")
    def _pairs(self) -> TLSFiles:
        for flag, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-ca", self.tls_ca)):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {path}: no such file")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        if self.tls_cert is not None and self.tls_require_client_cert and self.tls_ca is None:
            raise ValueError("--tls-require-client-cert needs --tls-ca (the CA client certificates chain to)")
        return self

    @property
    def server_enabled(self) -> bool:
        """Listeners speak TLS."""
        return self.tls_cert is not None

    @property
    def client_enabled(self) -> bool:
        """Outgoing channels speak TLS (verifying servers against --tls-ca)."""
        return self.tls_ca is not None


def _stamp(paths: tuple[Path | None, ...]) -> Stamp:
    out = []
    for path in paths:
        if path is None:
            out.append((0, 0, 0))
            continue
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


@dataclass(frozen=True)
class Material:
    """One consistent read of the files."""

    cert: bytes | None
    key: bytes | None
    ca: bytes | None
    stamp: Stamp


def _check_pair(cert: bytes, key: bytes) -> None:
    """Raises ssl.SSLError when the key does not belong to the certificate (or either is not PEM)."""
    with tempfile.TemporaryDirectory(prefix="kvmesh-tls-") as tmp:
        cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_path.write_bytes(cert)
        key_path.write_bytes(key)
        os.chmod(key_path, 0o600)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert_path, key_path)


class FileWatch:
    """The current TLS material: re-read when a file's stamp changes, kept when the new files are bad."""

    def __init__(self, files: TLSFiles) -> None:
        self.files = files
        self._paths = (files.tls_cert, files.tls_key, files.tls_ca)
        self._lock = threading.Lock()  # the gRPC fetcher runs on gRPC's threads
        self._material = self._read()  # a bad pair at start-up is an error, not a warning

    def _read(self) -> Material:
        stamp = _stamp(self._paths)
        cert, key, ca = (p.read_bytes() if p is not None else None for p in self._paths)
        if cert is not None and key is not None:
            _check_pair(cert, key)
        return Material(cert, key, ca, stamp)

    def current(self) -> tuple[Material, bool]:
        """(material, changed since the last call)."""
        with self._lock:
            try:
                if _stamp(self._paths) == self._material.stamp:
                    return self._material, False
                material = self._read()
            except (OSError, ssl.SSLError, ValueError) as exc:
                log.warning("TLS files changed but do not load (%s); still using the previous ones", exc)
                return self._material, False
            self._material = material
            log.info("TLS files reloaded", extra={"cert": str(self.files.tls_cert)})
            return material, True


# -- gRPC -------------------------------------------------------------------------------------


def _server_config(material: Material) -> Any:
    assert material.cert is not None and material.key is not None
    return grpc.ssl_server_certificate_configuration([(material.key, material.cert)], material.ca)


def grpc_server_credentials(files: TLSFiles) -> grpc.ServerCredentials:
    """Server credentials that pick up new certificate files for every new connection."""
    watch = FileWatch(files)
    initial, _ = watch.current()

    def fetch() -> Any:
        try:
            material, changed = watch.current()
            return _server_config(material) if changed else None
        except Exception:  # never let a rotation problem break the handshake path
            log.warning("TLS reload failed", exc_info=True)
            return None

    return grpc.dynamic_ssl_server_credentials(
        _server_config(initial), fetch, require_client_authentication=files.tls_require_client_cert)


class ClientTLS:
    """Channel credentials for outgoing gRPC channels; each new channel gets the current files."""

    def __init__(self, files: TLSFiles, token: Callable[[], str | None] | None = None) -> None:
        self.files = files
        self._watch = FileWatch(files)
        self._token = token
        self._credentials: grpc.ChannelCredentials | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        material, changed = self._watch.current()
        if changed or self._credentials is None:
            self._credentials = grpc.ssl_channel_credentials(material.ca, material.key, material.cert)
        credentials = self._credentials
        if self._token is not None:
            token = self._token()
            if token:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(token))
        return credentials

    def token(self) -> str | None:
        """The bearer token presented with each call, as the file holds it now (None: none)."""
        return self._token() if self._token is not None else None

    def channel_options(self) -> list[tuple[str, Any]]:
        if self.files.tls_server_name:
            return [("grpc.ssl_target_name_override", self.files.tls_server_name)]
        return []


# -- ssl contexts for asyncio servers and clients ---------------------------------------------


def _context_from(material: Material, purpose: ssl.Purpose, require_client_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cadata=material.ca.decode() if material.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if material.cert is not None and material.key is not None:
        with tempfile.TemporaryDirectory(prefix="kvmesh-tls-") as tmp:
            cert_path, key_path = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
            cert_path.write_bytes(material.cert)
            key_path.write_bytes(material.key)
            os.chmod(key_path, 0o600)
            ctx.load_cert_chain(cert_path, key_path)
    if purpose is ssl.Purpose.CLIENT_AUTH:
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_NONE
    return ctx


def server_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """An `ssl.SSLContext` for an asyncio server (`asyncio.start_server(ssl=...)`).

    Rotation: an `sni_callback` (called for every handshake, with or without SNI) swaps in a
    context rebuilt from the new files when they changed, so new connections use them."""
    if not files.server_enabled:
        raise ValueError("a TLS server needs --tls-cert and --tls-key")
    watch = FileWatch(files)
    material, _ = watch.current()
    state = {"ctx": _context_from(material, ssl.Purpose.CLIENT_AUTH, files.tls_require_client_cert)}

    def pick(sslobj: ssl.SSLObject, server_name: str | None, base: ssl.SSLContext) -> None:
        try:
            material, changed = watch.current()
            if changed:
                state["ctx"] = _context_from(material, ssl.Purpose.CLIENT_AUTH, files.tls_require_client_cert)
                state["ctx"].sni_callback = pick
            if state["ctx"] is not base:
                sslobj.context = state["ctx"]
        except Exception:
            log.warning("TLS reload failed", exc_info=True)

    state["ctx"].sni_callback = pick
    return state["ctx"]


def client_ssl_context(files: TLSFiles) -> ssl.SSLContext:
    """An `ssl.SSLContext` for one asyncio client connection, from the files as they are now
    (build one per connection, or per pool, to follow rotation). Verifies the server's certificate
    against --tls-ca and its host name; presents --tls-cert when given."""
    if not files.client_enabled:
        raise ValueError("a TLS client needs --tls-ca")
    material = FileWatch(files).current()[0]
    ctx = _context_from(material, ssl.Purpose.SERVER_AUTH, False)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx
