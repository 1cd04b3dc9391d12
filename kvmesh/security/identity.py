"""Who is calling: the authenticated principal of a gRPC call.

One rule, two sources:
- a bearer token in the `authorization` metadata (`Bearer <token>`): the principal the policy
  names for the token's SHA-256 (the policy stores only digests). A token that is present but
  unknown is bad credentials, even when a certificate came with it.
- otherwise the peer's verified client certificate (mutual TLS): the principal is the
  certificate's subject Common Name (the Kubernetes and etcd convention; cert-manager sets it with
  `commonName`). Subject alternative names are for host-name checks and are not identities here.

The principal is put in a context variable for the duration of the call (`current_principal()`),
so servicers ask for it without it being threaded through every signature.
"""

from __future__ import annotations

import contextvars
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

_CURRENT: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("kvmesh_principal", default=None)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: its name (what the policy grants to) and how it proved it."""

    name: str
    method: Literal["certificate", "token"]


class BadCredentials(Exception):
    """Credentials were presented but are not valid (an unknown token, a malformed header)."""


def token_digest(token: str) -> str:
    """The SHA-256 hex digest under which a policy stores a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` header; None when there is none."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise BadCredentials("the authorization header is not 'Bearer <token>'")
        return token.strip()
    return None


def certificate_name(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The subject Common Name of the peer's verified certificate, if it presented one.

    gRPC fills `x509_common_name` only for a certificate that chained to the server's CA."""
    names = list(auth_context.get("x509_common_name") or ())
    if not names:
        return None
    name = names[0].decode(errors="replace").strip()
    return name or None


def authenticate(auth_context: Mapping[str, Iterable[bytes]],
                 metadata: Iterable[tuple[str, str | bytes]] | None,
                 tokens: Mapping[str, str]) -> Principal | None:
    """The caller's principal: token first (digest looked up in `tokens`), then certificate.

    None when the call carries no credentials; BadCredentials when it carries invalid ones."""
    token = bearer_token(metadata)
    if token is not None:
        name = tokens.get(token_digest(token))
        if name is None:
            raise BadCredentials("unknown token")
        return Principal(name, "token")
    cn = certificate_name(auth_context)
    return Principal(cn, "certificate") if cn else None


def current_principal() -> Principal | None:
    """The principal of the call being served (None outside a call or with security off)."""
    return _CURRENT.get()


def set_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    return _CURRENT.set(principal)


def reset_principal(token: contextvars.Token[Principal | None]) -> None:
    _CURRENT.reset(token)
