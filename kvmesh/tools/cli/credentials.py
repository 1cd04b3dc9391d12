"""Client credentials for the command-line tools, taken the way services take them.

`kvmesh members`, `route`, `bench` and `health` dial services; against a mesh with TLS and a
policy they need the same files a member has: `--tls-ca` (verify the server), `--tls-cert` and
`--tls-key` (mutual TLS: the certificate's Common Name is the principal), `--auth-token-file`
(a bearer token instead), `--tls-server-name`. Each flag also reads its `KVMESH_*` variable;
the flag wins. With none given, channels stay plaintext, as before.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from kvmesh.security.client import configure_clients
from kvmesh.security.settings import SecuritySettings

CLIENT_FIELDS = ("tls_ca", "tls_cert", "tls_key", "tls_server_name", "auth_token_file")


def add_credential_arguments(parser: argparse.ArgumentParser) -> None:
    """The client-side security flags (descriptions from `SecuritySettings`, so they cannot drift)."""
    group = parser.add_argument_group("credentials (a mesh with TLS and a security policy)")
    for name in CLIENT_FIELDS:
        field = SecuritySettings.model_fields[name]
        env = "KVMESH_" + name.upper()
        group.add_argument("--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                           metavar=name.upper(), help=f"{field.description} [env {env}]")


def credentials_from_args(args: argparse.Namespace, tool: str) -> SecuritySettings | None:
    """The tool's client settings (flags over `KVMESH_*`); None after printing why they are invalid."""
    given = {name: getattr(args, name) for name in CLIENT_FIELDS if hasattr(args, name)}
    try:
        return SecuritySettings(**given)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]).replace("_", "-")
            print(f"kvmesh {tool}: invalid credentials{' --' + where if where else ''}: {err['msg']}",
                  file=sys.stderr)
        return None


def use_credentials(args: argparse.Namespace, tool: str) -> bool:
    """Sets this process's outgoing channels to the tool's credentials; False (after printing
    why) when they are invalid."""
    settings = credentials_from_args(args, tool)
    if settings is None:
        return False
    configure_clients(settings)
    return True
