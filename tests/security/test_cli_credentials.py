"""The command-line tools against a mesh with mutual TLS and a policy: `kvmesh route`, `members` and
`health` take credentials as services do (`--tls-*` flags, `KVMESH_TLS_*`, `--auth-token-file`),
and are refused without them. Each runs as the real `kvmesh` command in a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmesh.tools.certs import Issued
from tests.security.conftest import Pki
from tests.security.router_mesh import CLIENT_TOKEN, PROMPT, secured_router

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]


def tls_flags(pki: Pki, issued: Issued | None) -> list[str]:
    flags = ["--tls-ca", str(pki.ca.cert_path)]
    if issued is not None:
        flags += ["--tls-cert", str(issued.cert), "--tls-key", str(issued.key)]
    return flags


def tls_env(pki: Pki, issued: Issued) -> dict[str, str]:
    return {"KVMESH_TLS_CA": str(pki.ca.cert_path), "KVMESH_TLS_CERT": str(issued.cert),
            "KVMESH_TLS_KEY": str(issued.key)}


async def kvmesh(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The `kvmesh` command, with no `KVMESH_*` variable but those given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "kvmesh", *args], env={**base, "COLUMNS": "200", **(env or {})},
        capture_output=True, text=True, timeout=60)


async def test_route_with_credentials(pki: Pki, tmp_path: Path) -> None:
    async with secured_router(pki, tmp_path) as secured:
        blocks = ["--blocks", ",".join(map(str, PROMPT)), "--json", "--router", secured.router]
        done = await kvmesh("route", *blocks, *tls_flags(pki, pki.issue("client-cli")))
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        assert (answer["member_id"], answer["matched_blocks"]) == ("engine-0", len(PROMPT))
        # It released its own request afterwards (same principal).
        assert (await secured.stats()).inflight == 0
        # The same from the environment.
        done = await kvmesh("route", *blocks, env=tls_env(pki, pki.issue("client-env")))
        assert done.returncode == 0, done.stderr
        # A bearer token names the principal (the certificate only gets the connection through).
        token = tmp_path / "token"
        token.write_text(CLIENT_TOKEN + "\n")
        done = await kvmesh("route", *blocks, *tls_flags(pki, pki.issue("nobody")), "--auth-token-file", str(token))
        assert done.returncode == 0, done.stderr
        # Refused: plaintext to a TLS port, a principal without the grant.
        done = await kvmesh("route", *blocks)
        assert done.returncode == 1 and "UNAVAILABLE" in done.stderr, done.stderr
        done = await kvmesh("route", *blocks, *tls_flags(pki, pki.issue("nobody")))
        assert done.returncode == 1 and "PERMISSION_DENIED" in done.stderr, done.stderr
        # Bad credentials are a usage error, with the flag named.
        done = await kvmesh("route", *blocks, "--tls-ca", str(tmp_path / "missing.pem"))
        assert done.returncode == 2 and "--tls-ca" in done.stderr, done.stderr
        done = await kvmesh("route", *blocks, "--auth-token-file", str(token))
        assert done.returncode == 2 and "--tls-ca" in done.stderr, done.stderr
        assert (await secured.stats()).inflight == 0


async def test_members_and_health_with_credentials(pki: Pki, tmp_path: Path) -> None:
    async with secured_router(pki, tmp_path) as secured:
        viewer = pki.issue("client-viewer")
        done = await kvmesh("members", "--metadata", secured.metadata, "--role", "engine", *tls_flags(pki, viewer))
        assert done.returncode == 0, done.stderr
        assert "engine-0" in done.stdout and "engine-1" in done.stdout, done.stdout
        done = await kvmesh("members", "--metadata", secured.metadata, env=tls_env(pki, viewer))
        assert done.returncode == 0 and "engine-1" in done.stdout, done.stderr
        done = await kvmesh("members", "--metadata", secured.metadata, "--timeout", "2")
        assert done.returncode == 1, done.stdout

        for address in (secured.router, secured.metadata):
            done = await kvmesh("health", "--address", address, *tls_flags(pki, viewer))
            assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
            # Mutual TLS: the CA alone does not get a connection, nor does plaintext.
            done = await kvmesh("health", "--address", address, "--timeout", "2", *tls_flags(pki, None))
            assert done.returncode == 1, done.stdout
            done = await kvmesh("health", "--address", address, "--timeout", "2")
            assert done.returncode == 1, done.stdout
        # The container's HEALTHCHECK: no flags, the service's own KVMESH_LISTEN and TLS files.
        router_cert = pki.issue("router-0")
        done = await kvmesh("health", env={"KVMESH_LISTEN": secured.router, **tls_env(pki, router_cert)})
        assert done.returncode == 0 and "SERVING" in done.stdout, done.stdout + done.stderr
        done = await kvmesh("health", "--address", secured.router, "--tls-ca", str(tmp_path / "missing.pem"))
        assert done.returncode == 2, done.stdout


async def test_bench_refuses_bad_credentials(tmp_path: Path) -> None:
    done = await kvmesh("bench", "trace", "--limit", "1", "--tls-ca", str(tmp_path / "missing.pem"))
    assert done.returncode == 2 and "--tls-ca" in done.stderr, done.stdout + done.stderr
