"""A CA made by the tests, and helpers that turn its certificates into settings and flags."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.certs import CA, Issued, issue, make_ca


@dataclass
class Pki:
    directory: Path
    ca: CA

    def issue(self, name: str, **kw: Any) -> Issued:
        return issue(self.ca, name, self.directory, **kw)

    def server_flags(self, issued: Issued, require_client_cert: bool = True, **extra: Any) -> dict[str, Any]:
        """Settings (flags, for a process) of a service serving with `issued`."""
        return {"tls_cert": issued.cert, "tls_key": issued.key, "tls_ca": self.ca.cert_path,
                "tls_require_client_cert": require_client_cert, **extra}

    def client(self, issued: Issued | None, ca: Path | None = None, server_name: str | None = None) -> ClientTLS:
        """Client credentials presenting `issued` (None: no client certificate)."""
        files = TLSFiles(tls_cert=issued.cert if issued else None, tls_key=issued.key if issued else None,
                         tls_ca=ca or self.ca.cert_path, tls_server_name=server_name)
        return ClientTLS(files)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    directory = tmp_path / "pki"
    return Pki(directory, make_ca(directory, "kvmesh test CA"))
