"""Real Redis and etcd servers configured for TLS and authentication (the metadata backends' secure setups)."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import urllib.request
from pathlib import Path

from kvmesh.tools.certs import CA, Issued
from kvmesh.tools.testing.polling import eventually_sync
from kvmesh.tools.testing.ports import free_port, wait_port
from kvmesh.tools.testing.servers import ServerHandle, _need


def start_redis_tls(workdir: Path, ca: CA, server: Issued, user: str, password: str) -> ServerHandle:
    """redis-server on a TLS port only (client certificates required), the default user off and one
    ACL user with `password`."""
    port = free_port()
    args = [
        _need("redis-server", "redis-server"), "--bind", "127.0.0.1", "--port", "0", "--tls-port", str(port),
        "--tls-cert-file", str(server.cert), "--tls-key-file", str(server.key),
        "--tls-ca-cert-file", str(ca.cert_path), "--tls-auth-clients", "yes",
        "--save", "", "--appendonly", "no", "--dir", str(workdir),
        "--user", "default", "off",
        "--user", user, "on", f">{password}", "~*", "&*", "+@all",
    ]
    log = open(workdir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=workdir)
    wait_port("127.0.0.1", port)
    return ServerHandle("redis-tls", "127.0.0.1", port, proc, workdir)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def start_etcd_tls(workdir: Path, ca: CA, server: Issued, client: Issued, users: dict[str, tuple[str, str]]
                   ) -> ServerHandle:
    """etcd serving https only with client-certificate auth, then `auth enable` with `users`
    (name → (password, key prefix it may read and write)) and a root user."""
    port, peer = free_port(), free_port()
    args = [
        _need("etcd", "etcd-server"), "--name", "tls", "--data-dir", str(workdir / "etcd-data"),
        "--listen-client-urls", f"https://127.0.0.1:{port}", "--advertise-client-urls", f"https://127.0.0.1:{port}",
        "--listen-peer-urls", f"http://127.0.0.1:{peer}", "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
        "--initial-cluster", f"tls=http://127.0.0.1:{peer}",
        "--cert-file", str(server.cert), "--key-file", str(server.key),
        "--client-cert-auth", "--trusted-ca-file", str(ca.cert_path), "--log-level", "error",
    ]
    env = dict(os.environ, ETCD_UNSUPPORTED_ARCH=os.environ.get("ETCD_UNSUPPORTED_ARCH", ""))
    log = open(workdir / "etcd.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(args, stdout=log, stderr=log, cwd=workdir, env=env)
    handle = ServerHandle("etcd-tls", "127.0.0.1", port, proc, workdir, [peer])
    try:
        wait_port("127.0.0.1", port, timeout=20)
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        ctx.load_cert_chain(client.cert, client.key)

        def post(path: str, body: dict[str, object], token: str = "") -> dict[str, object]:
            req = urllib.request.Request(f"https://127.0.0.1:{port}/v3/{path}", data=json.dumps(body).encode(),
                                         method="POST", headers={"Authorization": token} if token else {})
            with urllib.request.urlopen(req, timeout=5, context=ctx) as resp:
                out: dict[str, object] = json.loads(resp.read())
                return out

        eventually_sync(lambda: post("kv/range", {"key": _b64("x")}) is not None, timeout=20, interval=0.1,
                        what="etcd (TLS) to answer", retry_on=OSError)
        post("auth/user/add", {"name": "root", "password": "root-pw"})
        post("auth/user/grant", {"user": "root", "role": "root"})
        for name, (password, prefix) in users.items():
            post("auth/role/add", {"name": name})
            end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
            post("auth/role/grant", {"name": name, "perm": {"permType": "READWRITE", "key": _b64(prefix),
                                                            "range_end": _b64(end)}})
            post("auth/user/add", {"name": name, "password": password})
            post("auth/user/grant", {"user": name, "role": name})
        post("auth/enable", {})
    except BaseException:
        handle.kill()
        raise
    return handle
