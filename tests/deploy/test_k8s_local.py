"""The rendered `demo` overlay, run without a cluster: every kvmesh pod as a local process.

Each pod's container gets what the kubelet would give it: the `envFrom` ConfigMaps of the
render, then its `env` list with `$(VAR)` expansion in order (downward API fields filled with
the pod's name, namespace and a per-pod IP), and its `args`. Then the cluster network is folded
onto loopback: pod IPs, stable pod DNS names (StatefulSet + headless Service) and Service names
become 127.0.0.1 with a free port per pod (a Service reaches its first pod), volume mounts
become temporary directories, and the in-cluster etcd is a real etcd started by the test. A
pod counts as ready when `kvmesh health` passes on its gRPC probe port, as the kubelet's
`grpc:` probe would. So the manifests' wiring (names, ports, variables, probes) cannot drift
from the code without this test failing.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmesh.testing.ports import free_port
from kvmesh.testing.processes import KvmeshProcess
from kvmesh.testing.servers import ServerHandle, etcd_server
from tests.deploy.k8s import K8S, documents, render
from tests.deploy.mesh_checks import expect_members, expect_round_trip, expect_route, wait_for

NAMESPACE = "kvmesh"
ADDRESS = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d{1,5})(?!\d)")
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
# Start order (Kubernetes has none: members retry; starting in waves keeps the test short).
WAVES = (("metadata",), ("cachenode", "router"), ("enginesim",), ("bench",))


class Pod:
    """One replica of a workload: its name, fake IP, resolved environment and args."""

    def __init__(self, workload: dict[str, Any], index: int, ip: str) -> None:
        self.workload = workload
        kind, name = workload["kind"], workload["metadata"]["name"]
        self.name = f"{name}-{index}" if kind == "StatefulSet" else f"{name}-{index}-local"
        self.ip = ip
        self.component = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        self.container = workload["spec"]["template"]["spec"]["containers"][0]
        self.env: dict[str, str] = {}
        self.process: KvmeshProcess | None = None

    def resolve_env(self, configmaps: dict[str, dict[str, Any]]) -> None:
        """envFrom first, then env in order with $(VAR) expansion, as the kubelet does."""
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        fields = {"metadata.name": self.name, "metadata.namespace": NAMESPACE, "status.podIP": self.ip}

        def expand(m: re.Match[str]) -> str:
            return env.get(m.group(1), m.group(0))  # an undefined $(VAR) stays as written

        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = VAR.sub(expand, item["value"])
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
        self.env = env

    @property
    def grpc_port(self) -> int | None:
        probe = self.container.get("readinessProbe", {})
        return int(probe["grpc"]["port"]) if "grpc" in probe else None


class LocalKube:
    def __init__(self, objs: list[dict[str, Any]], workdir: Path, etcd: ServerHandle) -> None:
        self.workdir = workdir
        self.configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        self.services = [o for o in objs if o["kind"] == "Service"]
        self.pods: list[Pod] = []
        self.addresses: dict[tuple[str, int], str] = {("kvmesh-etcd", 2379): etcd.address}
        ip = 10
        for obj in objs:
            if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
                continue
            if not obj["spec"]["template"]["spec"]["containers"][0]["image"].startswith("kvmesh/kvmesh"):
                assert obj["metadata"]["name"] == "kvmesh-etcd", obj["metadata"]["name"]  # replaced by `etcd`
                continue
            for i in range(int(obj["spec"].get("replicas", 1))):
                ip += 1
                pod = Pod(obj, i, f"10.244.0.{ip}")
                pod.resolve_env(self.configmaps)
                self.pods.append(pod)
        for pod in self.pods:
            port = pod.grpc_port
            if port is None:
                continue
            local = f"127.0.0.1:{free_port()}"
            self.addresses[(pod.ip, port)] = local
            headless = pod.workload["spec"].get("serviceName")
            if headless:
                for suffix in ("", f".{NAMESPACE}", f".{NAMESPACE}.svc", f".{NAMESPACE}.svc.cluster.local"):
                    self.addresses[(f"{pod.name}.{headless}{suffix}", port)] = local
        for svc in self.services:
            selected = [p for p in self.pods if all(
                p.workload["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in svc["spec"]["selector"].items())]
            if not selected or selected[0].grpc_port is None:
                continue
            for port in svc["spec"]["ports"]:
                name = svc["metadata"]["name"]
                for host in (name, f"{name}.{NAMESPACE}", f"{name}.{NAMESPACE}.svc"):
                    self.addresses[(host, int(port["port"]))] = self.addresses[(selected[0].ip, selected[0].grpc_port)]

    def local(self, pod: Pod) -> str:
        assert pod.grpc_port is not None
        return self.addresses[(pod.ip, pod.grpc_port)]

    def of(self, component: str) -> list[Pod]:
        return [p for p in self.pods if p.component == component]

    def _rewrite(self, pod: Pod, value: str) -> str:
        if value.startswith("0.0.0.0:"):
            return self.local(pod)
        value = ADDRESS.sub(lambda m: self.addresses.get((m.group(1), int(m.group(2))), m.group(0)), value)
        for mount in pod.container.get("volumeMounts", []):
            here = self.workdir / pod.name / mount["name"]
            here.mkdir(parents=True, exist_ok=True)
            value = re.sub(rf"(?:(?<=://)|(?<==)){re.escape(mount['mountPath'])}(?=$|[/?,])", str(here), value)
        return value

    def start(self, pod: Pod) -> KvmeshProcess:
        env = {k: self._rewrite(pod, v) for k, v in pod.env.items()}
        unexpanded = [k for k, v in env.items() if VAR.search(v)]
        assert not unexpanded, f"{pod.name}: $(VAR) left unexpanded in {unexpanded}"
        args = [self._rewrite(pod, a) for a in pod.container["args"]]
        pod.process = KvmeshProcess(args, env=env, name=pod.name)
        return pod.process

    def stop(self) -> list[str]:
        for pod in reversed(self.pods):
            if pod.process is not None:
                pod.process.terminate()
        return [p.name for p in self.pods if p.process is not None and p.process.running()]


def _probe(address: str) -> bool:
    from kvmesh.cli.health import check

    return check(address, timeout=3)[0]


@pytest.fixture
def etcd_for_kube() -> Iterator[ServerHandle]:
    with etcd_server() as handle:
        yield handle


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_demo_overlay_runs_as_local_pods(etcd_for_kube: ServerHandle, tmp_path: Path) -> None:
    objs = documents(render(K8S / "overlays" / "demo"))
    kube = LocalKube(objs, tmp_path, etcd_for_kube)
    assert sorted({p.component for p in kube.pods}) == ["bench", "cachenode", "enginesim", "metadata", "router"]
    assert {c for wave in WAVES for c in wave} == {p.component for p in kube.pods}
    try:
        for wave in WAVES[:-1]:
            started = [p for p in kube.pods if p.component in wave]
            for pod in started:
                kube.start(pod)
            for pod in started:
                assert pod.process is not None
                pod.process.wait_ready(60)
                wait_for(functools.partial(_probe, kube.local(pod)), f"{pod.name} readiness probe", timeout=60)

        # Members registered under their pod names and advertised addresses, via the metadata Service.
        cachenodes = {p.name: kube.local(p) for p in kube.of("cachenode")}
        engines = {p.name: kube.local(p) for p in kube.of("enginesim")}
        assert sorted(cachenodes) == ["kvmesh-cachenode-0", "kvmesh-cachenode-1", "kvmesh-cachenode-2"]
        for pod in kube.of("metadata"):
            expect_members(kube.local(pod), cachenodes, engines)
        expect_route(kube.addresses[("kvmesh-router", 7600)], engines)
        for name, address in cachenodes.items():
            expect_round_trip(address, name, min_tiers=2)

        # The bench Job replays through the router Service and exits 0.
        (bench,) = kube.of("bench")
        args = bench.container["args"]
        assert "--limit=200" in args and "--speedup=10" in args
        assert kube.of("enginesim")[0].env["KVMESH_SPEEDUP"] == "10", "engines and replay share a clock"
        # A shorter replay than the demo's (the only change made to the manifests).
        bench.container = {**bench.container, "args": [a.replace("--limit=200", "--limit=24") for a in args]}
        job = kube.start(bench)
        code = job.wait_exit(180)
        assert code == 0, job.output[-4000:]
        summary = next(line for line in job.lines if line.startswith("KVMESH_BENCH_SUMMARY "))
        rows = json.loads(summary.split(" ", 1)[1])
        assert rows[0]["mode"] == "live" and rows[0]["requests"] == 24, rows
        assert (tmp_path / bench.name / "tmp" / "results" / "results.json").exists()
    finally:
        leaked = kube.stop()
    assert not leaked, f"still running after SIGTERM: {leaked}"
