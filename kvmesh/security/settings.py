"""The security settings every process takes: TLS files, a bearer token to present, a policy to enforce.

Composed into `ServiceSettings` (so every service has the flags) and read on their own from
`KVMESH_*` environment variables by tools that are not services (`SecuritySettings()`).
With none of them set, nothing changes: plaintext, no authentication.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from kvmesh.security.tls import TLSFiles


class SecuritySettings(TLSFiles):
    """TLS files plus the token this process presents and the policy it enforces."""

    auth_token_file: Path | None = Field(
        None, description="file holding a bearer token sent on every outgoing call (needs --tls-ca: "
                          "tokens never travel in clear text)")
    security_policy: Path | None = Field(
        None, description="policy file (YAML or JSON): every call must then authenticate "
                          "(see docs/security.md); re-read when it changes")

    @model_validator(mode="after")
    def _token_needs_tls(self) -> SecuritySettings:
        if self.auth_token_file is not None and not self.client_enabled:
            raise ValueError("--auth-token-file needs --tls-ca: a token must not travel in clear text")
        return self
