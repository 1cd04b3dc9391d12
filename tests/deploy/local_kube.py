"""Kubernetes workloads run without a cluster: every kvmesh pod as a local process.

Each pod's container gets what the kubelet would give it: the `envFrom` ConfigMaps, then its
`env` list with `$(VAR)` expansion in order (downward-API fields filled with the pod's name,
namespace and a per-pod IP; Secret keys from a given table), and its `args`. The cluster
network is folded onto loopback: pod IPs, stable pod DNS names (StatefulSet + headless
Service) and Service names become 127.0.0.1 with a free port per pod (a Service reaches its
first pod), and volume mounts become temporary directories. Workloads that are not kvmesh
(etcd) are replaced by real servers. A pod is ready when `kvmesh health` passes on its gRPC
probe port, as the kubelet's `grpc:` probe would.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from kvmesh.tools.cli.health import check
from kvmesh.tools.processes import KvmeshProcess
from kvmesh.tools.testing.ports import free_port
from tests.deploy.mesh_checks import wait_for

ADDRESS = re.compile(r"(?<![\w.-])([A-Za-z0-9][\w.-]*):(\d{1,5})(?!\d)")
VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
class Pod:
    """One replica of a workload: its name, fake IP, resolved environment and args."""

    def __init__(self, workload: dict[str, Any], index: int, ip: str) -> None:
        self.workload = workload
        self.namespace = workload["metadata"].get("namespace", "default")
        kind, name = workload["kind"], workload["metadata"]["name"]
        self.name = f"{name}-{index}" if kind == "StatefulSet" else f"{name}-{index}-local"
        self.ip = ip
        self.component = workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
        self.container = workload["spec"]["template"]["spec"]["containers"][0]
        self.env: dict[str, str] = {}
        self.process: KvmeshProcess | None = None

    def resolve_env(self, configmaps: dict[str, dict[str, Any]], secrets: dict[tuple[str, str], str]) -> None:
        """envFrom first, then env in order with $(VAR) expansion, as the kubelet does."""
        env: dict[str, str] = {}
        for source in self.container.get("envFrom", []):
            env.update(configmaps[source["configMapRef"]["name"]]["data"])
        fields = {"metadata.name": self.name, "metadata.namespace": self.namespace, "status.podIP": self.ip}

        def expand(m: re.Match[str]) -> str:
            return env.get(m.group(1), m.group(0))  # an undefined $(VAR) stays as written

        for item in self.container.get("env", []):
            if "value" in item:
                env[item["name"]] = VAR.sub(expand, item["value"])
            elif "fieldRef" in item.get("valueFrom", {}):
                env[item["name"]] = fields[item["valueFrom"]["fieldRef"]["fieldPath"]]
            elif "secretKeyRef" in item.get("valueFrom", {}):
                ref = item["valueFrom"]["secretKeyRef"]
                if (ref["name"], ref["key"]) in secrets:
                    env[item["name"]] = secrets[(ref["name"], ref["key"])]
                else:
                    assert ref.get("optional"), f"{self.name}: Secret {ref['name']}/{ref['key']} is required"
        self.env = env

    @property
    def grpc_port(self) -> int | None:
        probe = self.container.get("readinessProbe", {})
        return int(probe["grpc"]["port"]) if "grpc" in probe else None


class LocalKube:
    """Kubernetes workloads as local processes.

    `infra` maps (service name, port) to the address of a real server standing in for an
    in-cluster workload that is not kvmesh (etcd); `secrets` maps (Secret, key) to its value.
    """

    def __init__(self, objs: list[dict[str, Any]], workdir: Path, infra: dict[tuple[str, int], str],
                 secrets: dict[tuple[str, str], str] | None = None) -> None:
        self.workdir = workdir
        self.configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        self.services = [o for o in objs if o["kind"] == "Service"]
        self.pods: list[Pod] = []
        self.addresses: dict[tuple[str, int], str] = dict(infra)
        infra_names = {name for name, _ in infra}
        ip = 10
        for obj in objs:
            if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
                continue
            if not obj["spec"]["template"]["spec"]["containers"][0]["image"].startswith("kvmesh/"):
                assert obj["metadata"]["name"] in infra_names, f"nothing stands in for {obj['metadata']['name']}"
                continue
            for i in range(int(obj["spec"].get("replicas", 1))):
                ip += 1
                pod = Pod(obj, i, f"10.244.0.{ip}")
                pod.resolve_env(self.configmaps, secrets or {})
                self.pods.append(pod)
        for pod in self.pods:
            port = pod.grpc_port
            if port is None:
                continue
            local = f"127.0.0.1:{free_port()}"
            self.addresses[(pod.ip, port)] = local
            headless, ns = pod.workload["spec"].get("serviceName"), pod.namespace
            if headless:
                for suffix in ("", f".{ns}", f".{ns}.svc", f".{ns}.svc.cluster.local"):
                    self.addresses[(f"{pod.name}.{headless}{suffix}", port)] = local
        for svc in self.services:
            selected = [p for p in self.pods if all(
                p.workload["spec"]["template"]["metadata"]["labels"].get(k) == v
                for k, v in svc["spec"]["selector"].items())]
            if not selected or selected[0].grpc_port is None:
                continue
            for port in svc["spec"]["ports"]:
                name, ns = svc["metadata"]["name"], svc["metadata"].get("namespace", "default")
                for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc"):
                    self.addresses[(host, int(port["port"]))] = self.addresses[(selected[0].ip, selected[0].grpc_port)]

    def local(self, pod: Pod) -> str:
        assert pod.grpc_port is not None
        return self.addresses[(pod.ip, pod.grpc_port)]

    def of(self, component: str) -> list[Pod]:
        return [p for p in self.pods if p.component == component]

    def _rewrite(self, pod: Pod, value: str) -> str:
        if value.startswith("0.0.0.0:"):
            port = int(value.rpartition(":")[2])
            if port == pod.grpc_port:
                return self.local(pod)
            # Another listener of the pod (an HTTP face): a loopback port of its own.
            return self.addresses.setdefault((pod.ip, port), f"127.0.0.1:{free_port()}")
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

    def start_ready(self, pods: list[Pod], timeout: float = 60.0) -> None:
        """Starts the pods, then waits for each one's ready line and gRPC readiness probe."""
        for pod in pods:
            self.start(pod)
        for pod in pods:
            assert pod.process is not None
            pod.process.wait_ready(timeout)
            wait_for(functools.partial(probe, self.local(pod)), f"{pod.name} readiness probe", timeout=timeout)


def probe(address: str) -> bool:
    """What the kubelet's `grpc:` probe checks: grpc.health.v1 says SERVING."""
    return check(address, timeout=3)[0]
