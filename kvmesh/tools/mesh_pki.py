"""The credentials and the policy a local mesh (`kvmesh up`) runs with: secure by default.

One CA per state folder (made once, reused by later runs, so a client trusting it keeps working),
one certificate per member named after its member id (its identity), and a policy granting each
member exactly what its role needs and nothing else:

- a cache node registers only itself, only as a cache node, with at most its own capacity;
- the router registers itself as the router (membership List/Watch is open to any authenticated
  principal, so following the engines needs no grant);
- an engine simulator registers itself as an engine, reports only its own KV events and reads and
  writes the cache-pool namespace it uses (it never routes: the gateway or the demo does);
- the supervisor `kvmesh-up` is admin (health checks, waiting for members, the demo);
- `kvmesh-cli` is the certificate a person's tools present (`kvmesh members`, `kvmesh route`):
  it may route, and list members like any authenticated principal.

The metadata service makes no calls into the mesh and is granted nothing. Member certificates
and the policy are written again on every start (a rotation for anything still running on the
old ones); a lock file keeps two `kvmesh up` on one state folder from interleaving.
"""

from __future__ import annotations

import contextlib
import fcntl
import shlex
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from kvmesh.security.policy import parse_policy
from kvmesh.tools.certs import CA, Issued, ensure_ca, issue, write_atomically

SUPERVISOR = "kvmesh-up"
CLI = "kvmesh-cli"
POLICY_FILE = "policy.yaml"
CLIENT_ENV_FILE = "client.env"
CERT_DAYS = 7  # a local mesh's member certificates; reissued on every start


def mesh_policy(cachenodes: Sequence[str], node_capacity_bytes: int, router: str, engines: Sequence[str],
                engine_namespace: str) -> dict[str, Any]:
    """The policy of a local mesh, as the data of a policy file (docs/security.md's schema)."""
    principals: dict[str, Any] = {}
    for name in cachenodes:
        principals[name] = {"register": {"roles": ["cachenode"], "members": ["self"],
                                         "max_capacity_bytes": node_capacity_bytes}}
    principals[router] = {"register": {"roles": ["router"], "members": ["self"]}}
    for name in engines:
        principals[name] = {"register": {"roles": ["engine"], "members": ["self"]}, "events": ["self"],
                            "namespaces": {"read": [engine_namespace], "write": [engine_namespace]}}
    principals[SUPERVISOR] = {"admin": True}
    principals[CLI] = {"route": True}
    return {"principals": principals}


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive lock on the state folder while files are (re)written (a blocking call: no loop runs here)."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)  # new folders: the owner's alone
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@dataclass(frozen=True)
class MeshCredentials:
    """Where a local mesh's CA, certificates and policy are, and the flags each member runs with."""

    directory: Path
    ca: CA
    policy: Path
    issued: dict[str, Issued] = field(default_factory=dict)

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path

    def flags(self, name: str) -> list[str]:
        """Mutual TLS with `name`'s certificate, client certificates required, the policy enforced."""
        own = self.issued[name]
        return ["--tls-cert", str(own.cert), "--tls-key", str(own.key), "--tls-ca", str(self.ca_path),
                "--tls-require-client-cert", "--security-policy", str(self.policy)]

    def client_env(self, name: str = CLI) -> dict[str, str]:
        """The KVMESH_TLS_* variables a tool reads to connect as `name`."""
        own = self.issued[name]
        return {"KVMESH_TLS_CA": str(self.ca_path), "KVMESH_TLS_CERT": str(own.cert),
                "KVMESH_TLS_KEY": str(own.key)}


def prepare_mesh_credentials(directory: Path, *, host: str, cachenodes: Sequence[str], node_capacity_bytes: int,
                             router: str, engines: Sequence[str], engine_namespace: str,
                             extra_members: Sequence[str] = ("metadata",)) -> MeshCredentials:
    """Makes (or reuses) the CA in `directory`, issues every member's certificate and writes the
    policy and a `client.env` a shell can source to connect as `kvmesh-cli`."""
    hosts = sorted({host, "127.0.0.1", "localhost"})
    with _locked(directory):
        ca = ensure_ca(directory)
        names = [*extra_members, *cachenodes, router, *engines, SUPERVISOR, CLI]
        issued = {name: issue(ca, name, directory, hosts=hosts, days=CERT_DAYS) for name in names}
        data = mesh_policy(cachenodes, node_capacity_bytes, router, engines, engine_namespace)
        text = ("# Written by `kvmesh up` on every start: what each member of the local mesh may do\n"
                "# (docs/security.md). Edits last until the next start.\n" + yaml.safe_dump(data, sort_keys=False))
        parse_policy(text, POLICY_FILE)  # never start a mesh on a policy the services would refuse
        policy = directory / POLICY_FILE
        write_atomically(policy, text.encode())
        creds = MeshCredentials(directory, ca, policy, issued)
        env = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in creds.client_env().items())
        write_atomically(directory / CLIENT_ENV_FILE, env.encode())
    return creds
