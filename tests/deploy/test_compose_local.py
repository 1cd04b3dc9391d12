"""The compose file, run for real without Docker: each service's command and environment as a local process.

`docker compose config` resolves the file (anchors, profiles, interpolation); every kvmesh
service then starts as `python -m kvmesh <command>` with exactly its compose environment,
after three rewrites a container network would make unnecessary: service host names (and
aliases) become 127.0.0.1, each container port becomes a free local port, and volume mount
points become temporary directories. etcd and Redis are real servers started for this test. The
mesh runs as compose runs it, on mutual TLS with the policy: scripts/compose_certs.sh makes the
development CA and every service's certificate (KVMESH_CERTS_DIR points compose at them), the
test's own client presents the `ops` certificate, and a plaintext client is refused.
Services start in depends_on order and a service counts as healthy when its own compose
healthcheck command says so. If the compose file drifts from the code (a renamed flag, a
wrong port, a missing dependency), this test fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmesh.security.settings import SecuritySettings
from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.processes import KvmeshProcess, kvmesh_env
from kvmesh.tools.testing.envoy import run_envoy
from kvmesh.tools.testing.polling import eventually_sync
from kvmesh.tools.testing.ports import free_port
from kvmesh.tools.testing.servers import ServerHandle, etcd_server, redis_server
from tests.deploy.cli_envs import setting_envs
from tests.deploy.compose import ROOT, resolved_config
from tests.deploy.mesh_checks import expect_members, expect_plaintext_refused, expect_round_trip, expect_route

SERVICE_COMMANDS = ("metadata", "cachenode", "router", "enginesim")
GATEWAYS = ("gateway",)  # Envoy, started with the real binary after the mesh is up
# Small enough for a loaded 2-core machine; the same variables a user sets for `docker compose up`.
TEST_VARIABLES = {"KVMESH_BENCH_LIMIT": "24", "KVMESH_BENCH_SPEEDUP": "20", "KVMESH_LOG_LEVEL": "warning"}
ADDRESS = re.compile(r"(?<![\w.-])([A-Za-z][\w.-]*):(\d{1,5})(?!\d)")
# Every tool reads how to connect from these (kvmesh.security.client), not from flags of its own.
SECURITY_ENVS = frozenset(f"KVMESH_{name.upper()}" for name in SecuritySettings.model_fields)


def make_certs(directory: Path) -> dict[str, str]:
    """The compose development CA and certificates (the shipped script), and the compose
    variables that point the file at them."""
    env = kvmesh_env({"KVMESH": str(Path(sys.executable).parent / "kvmesh")})
    done = subprocess.run([str(ROOT / "scripts" / "compose_certs.sh"), str(directory)], capture_output=True,
                          text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"KVMESH_CERTS_DIR": str(directory)}


def ops_tls(directory: Path) -> ClientTLS:
    """A person's admin certificate from the compose CA (never mounted into a container)."""
    ops = directory / "ops"
    return ClientTLS(TLSFiles(tls_cert=ops / "ops.pem", tls_key=ops / "ops-key.pem", tls_ca=ops / "ca.pem"))


def test_every_compose_variable_is_a_real_setting() -> None:
    """A KVMESH_* variable that no flag reads would be silently ignored in a container."""
    known = {command: setting_envs(command) for command in (*SERVICE_COMMANDS, "bench")}
    for profile in ("etcd", "redis"):
        for name, svc in resolved_config(profile)["services"].items():
            command = (svc.get("command") or [""])[0]
            if command in known:
                unknown = set(svc.get("environment", {})) - known[command] - SECURITY_ENVS
                assert not unknown, f"{profile}/{name}: {sorted(unknown)} are not settings of `kvmesh {command}`"


class LocalCompose:
    """Runs a resolved compose model as local processes on loopback."""

    def __init__(self, config: dict[str, Any], workdir: Path, infra: dict[str, ServerHandle]) -> None:
        self.services: dict[str, dict[str, Any]] = config["services"]
        self.workdir = workdir
        self.addresses: dict[tuple[str, int], str] = {}
        for name, handle in infra.items():
            self.addresses[(name, {"etcd": 2379, "redis": 6379}[name])] = handle.address
        self.infra = set(infra)
        for name, svc in self.services.items():
            if name in self.infra or "KVMESH_LISTEN" not in svc.get("environment", {}):
                continue
            aliases = (svc.get("networks", {}).get("default") or {}).get("aliases", [])
            # Every listener of the service (gRPC, the router's ext_proc, an engine's HTTP face).
            for key, value in svc["environment"].items():
                if key.endswith("_LISTEN") and value.startswith("0.0.0.0:"):
                    port = int(value.rpartition(":")[2])
                    local = f"127.0.0.1:{free_port()}"
                    for host in (name, *aliases):
                        self.addresses[(host, port)] = local
        self.processes: dict[str, KvmeshProcess] = {}

    def local(self, service: str) -> str:
        """Where a service listens here."""
        port = int(self.services[service]["environment"]["KVMESH_LISTEN"].rpartition(":")[2])
        return self.addresses[(service, port)]

    def _rewrite(self, service: str, value: str) -> str:
        if value.startswith("0.0.0.0:"):
            return self.addresses[(service, int(value.rpartition(":")[2]))]

        def address(m: re.Match[str]) -> str:
            return self.addresses.get((m.group(1), int(m.group(2))), m.group(0))

        value = ADDRESS.sub(address, value)
        places: dict[str, str] = {}
        for volume in self.services[service].get("volumes", []):
            target, here = volume["target"], self.workdir / service / volume["source"]  # a bind: its own path
            here.mkdir(parents=True, exist_ok=True)
            places[target] = str(here)
        if not places:
            return value
        # One pass over every mount point (longest first), so a replaced path is never replaced again.
        targets = "|".join(re.escape(t) for t in sorted(places, key=len, reverse=True))
        return re.sub(rf"(?:^|(?<=://)|(?<==))({targets})(?=$|[/?,])", lambda m: places[m.group(1)], value)

    def order(self) -> list[list[str]]:
        """Services in waves: each wave depends only on earlier ones (what compose does)."""
        pending = {n for n in self.services if n not in self.infra and n not in GATEWAYS}
        done = set(self.infra)
        waves = []
        while pending:
            wave = sorted(n for n in pending if all(
                d in done or d not in self.services for d in self.services[n].get("depends_on", {})))
            assert wave, f"depends_on cycle among {pending}"
            waves.append(wave)
            done |= set(wave)
            pending -= set(wave)
        return waves

    def start(self, name: str) -> KvmeshProcess:
        svc = self.services[name]
        assert svc["command"][0] in (*SERVICE_COMMANDS, "bench"), svc["command"]
        env = {k: self._rewrite(name, v) for k, v in svc.get("environment", {}).items()}
        args = [self._rewrite(name, a) for a in svc["command"]]
        proc = KvmeshProcess(args, env=env, name=name)
        self.processes[name] = proc
        return proc

    def healthy(self, name: str, timeout: float = 60.0) -> None:
        """Runs the service's own compose healthcheck (`kvmesh health`) until it passes."""
        test = self.services[name]["healthcheck"]["test"]
        assert test[:3] == ["CMD", "kvmesh", "health"]
        env = {k: self._rewrite(name, v) for k, v in self.services[name]["environment"].items()}
        proc = self.processes[name]

        def passes() -> bool:
            done = subprocess.run([sys.executable, "-m", "kvmesh", *test[2:]], capture_output=True, text=True,
                                  env=kvmesh_env(env), timeout=60)
            if done.returncode == 0:
                return True
            if not proc.running():  # not retried: an exited service never becomes healthy
                raise RuntimeError(f"{name} exited:\n{proc.output[-3000:]}")
            raise AssertionError(f"{name} not healthy yet:\n{proc.output[-3000:]}")

        eventually_sync(passes, timeout=timeout, interval=0.5, what=f"{name} to become healthy")

    def stop(self) -> list[str]:
        for proc in reversed(list(self.processes.values())):
            proc.terminate()
        return [n for n, p in self.processes.items() if p.running()]


def expect_gateway_answers(mesh: LocalCompose, workdir: Path) -> None:
    svc = mesh.services["gateway"]
    config_file = next(v["source"] for v in svc["volumes"] if v["target"] == "/etc/envoy/envoy.yaml")
    text = Path(config_file).read_text()
    port, admin = free_port(), free_port()
    listen = int(svc["ports"][0]["target"])
    text = text.replace(f"{{address: 0.0.0.0, port_value: {listen}}}", f"{{address: 127.0.0.1, port_value: {port}}}")
    text = text.replace("port_value: 9901", f"port_value: {admin}")
    host, _, picker_port = mesh.addresses[("router", 9002)].rpartition(":")
    text = text.replace("{address: router, port_value: 9002}", f"{{address: {host}, port_value: {picker_port}}}")
    text = text.replace("type: STRICT_DNS", "type: STATIC")
    # The gateway's own certificate folder, where compose mounts it (mutual TLS to the picker).
    certs = next(v["source"] for v in svc["volumes"] if v["target"] == "/certs")
    assert "filename: /certs/gateway.pem" in text and "sni: router" in text
    text = text.replace("{filename: /certs/", f"{{filename: {certs}/")
    gateway = run_envoy(workdir, text, port, admin)
    try:
        body = json.dumps({"model": "llama-3-8b", "prompt": "hello from compose " * 8, "max_tokens": 2}).encode()
        request = urllib.request.Request(f"{gateway.url}/v1/completions", data=body,
                                         headers={"content-type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as resp:
            assert resp.status == 200
            assert resp.headers["x-kvmesh-engine"] in ("enginesim-1", "enginesim-2")
            assert json.loads(resp.read())["object"] == "text_completion"
    finally:
        gateway.stop()


@pytest.fixture
def infra(request: pytest.FixtureRequest) -> Iterator[dict[str, ServerHandle]]:
    """This test's own etcd or Redis (not the session ones: other tests' members must not show up)."""
    server = etcd_server if request.param == "etcd" else redis_server
    with server() as handle:
        yield {request.param: handle}


@pytest.mark.integration
@pytest.mark.timeout(240)
@pytest.mark.parametrize("infra", ["etcd", "redis"], indirect=True)
def test_compose_services_form_a_mesh(infra: dict[str, ServerHandle], tmp_path: Path) -> None:
    profile = next(iter(infra))
    certs = tmp_path / "certs"
    mesh = LocalCompose(resolved_config(profile, TEST_VARIABLES | make_certs(certs)), tmp_path, infra)
    tls = ops_tls(certs)
    waves = mesh.order()
    assert waves[-1] == ["bench"], waves
    try:
        for wave in waves[:-1]:
            for name in wave:
                mesh.start(name)
            for name in wave:
                mesh.processes[name].wait_ready(60)
                mesh.healthy(name)

        # Both metadata replicas serve the same membership (one etcd / one Redis behind them).
        cachenodes = {f"cachenode-{i}": mesh.local(f"cachenode-{i}") for i in (1, 2, 3)}
        engines = {f"enginesim-{i}": mesh.local(f"enginesim-{i}") for i in (1, 2)}
        for replica in ("metadata-1", "metadata-2"):
            expect_members(mesh.addresses[(replica, 7400)], cachenodes, engines, tls=tls)
        # Every port speaks mutual TLS only.
        for name in (*cachenodes, *engines, "metadata-1", "router"):
            expect_plaintext_refused(mesh.local(name) if name != "metadata-1" else mesh.addresses[(name, 7400)])
        # The router routes to a simulator.
        expect_route(mesh.local("router"), engines, tls=tls)
        # A cache round trip on every node (DRAM L1 over the disk tier on its volume).
        for name, address in cachenodes.items():
            expect_round_trip(address, name, min_tiers=2, tls=tls)
            assert (tmp_path / name / f"{name}-data").is_dir()

        # The gateway: the real Envoy with the compose file's own envoy.yaml (addresses made local)
        # answers an OpenAI request through the router's endpoint picker.
        expect_gateway_answers(mesh, tmp_path)

        if profile == "etcd":
            # The one-shot benchmark job replays its workload through the running mesh and succeeds.
            bench = mesh.start("bench")
            code = bench.wait_exit(150)
            assert code == 0, bench.output[-4000:]
            results = tmp_path / "bench" / "bench-results" / "results.json"
            assert results.exists(), bench.output[-2000:]
            summary = next(line for line in bench.lines if line.startswith("KVMESH_BENCH_SUMMARY "))
            rows = json.loads(summary.split(" ", 1)[1])
            limit = int(TEST_VARIABLES["KVMESH_BENCH_LIMIT"])
            assert len(rows) == 1 and rows[0]["mode"] == "live", rows
            assert rows[0]["requests"] == limit and rows[0]["prompt_blocks"] > 0, rows
    finally:
        leaked = mesh.stop()
    assert not leaked, f"still running after SIGTERM: {leaked}"


def test_compose_certs_script_keeps_the_ca_and_reissues_every_certificate(tmp_path: Path) -> None:
    """Re-running the script is a rotation: same CA, new certificates in the same (mounted) folders,
    each naming its service and valid for its host name and loopback."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    def leaf(name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((tmp_path / name / f"{name}.pem").read_bytes())

    make_certs(tmp_path)
    ca = (tmp_path / "ca.pem").read_bytes()
    first = leaf("cachenode-1").serial_number
    make_certs(tmp_path)
    assert (tmp_path / "ca.pem").read_bytes() == ca == (tmp_path / "cachenode-1" / "ca.pem").read_bytes()
    again = leaf("cachenode-1")
    assert again.serial_number != first
    assert again.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "cachenode-1"
    names = again.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "cachenode-1" in names.get_values_for_type(x509.DNSName)
    assert not (tmp_path / "cachenode-1" / "ca-key.pem").exists()  # the CA key is never in a mounted folder
