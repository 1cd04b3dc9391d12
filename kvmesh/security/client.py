"""How this process's outgoing channels authenticate: TLS files and a bearer token.

A service configures it once at start-up from its settings (`configure_clients`); a tool that is
not a service gets it from `KVMESH_TLS_*` / `KVMESH_AUTH_TOKEN_FILE` in its environment. Like the
registries, it is set once and then only read.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvmesh.security.settings import SecuritySettings
from kvmesh.security.tls import ClientTLS

_configured: list[ClientTLS | None] = []


class TokenFile:
    """A token read from a file, re-read when the file changes (tokens rotate too)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token = ""

    def __call__(self) -> str | None:
        st = os.stat(self.path)
        if (st.st_mtime_ns, st.st_size) != self._stamp:
            self._token = self.path.read_text().strip()
            self._stamp = (st.st_mtime_ns, st.st_size)
        return self._token or None


def client_tls(settings: SecuritySettings) -> ClientTLS | None:
    """Channel credentials from settings; None when outgoing channels stay plaintext."""
    if not settings.client_enabled:
        return None
    token = TokenFile(settings.auth_token_file) if settings.auth_token_file is not None else None
    return ClientTLS(settings, token)


def configure_clients(settings: SecuritySettings) -> None:
    """Sets how this process's channels authenticate (a service calls this at start-up)."""
    _configured[:] = [client_tls(settings)]


def process_client_tls() -> ClientTLS | None:
    """What `configure_clients` set, else what the environment says (read once)."""
    if not _configured:
        _configured.append(client_tls(SecuritySettings()))
    return _configured[0]
