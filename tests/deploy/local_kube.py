"""Kubernetes workloads run without a cluster: every kvmesh pod as a local process.

Each pod's container gets what the kubelet would give it: the `envFrom` ConfigMaps, then its
`env` list with `$(VAR)` expansion in order (downward-API fields filled with the pod's name,
namespace and a per-pod IP; Secret keys from a given table), and its `args`. The cluster
network is folded onto loopback: pod IPs, stable pod DNS names (StatefulSet + headless
Service) and Service names become 127.0.0.1 with a free port per pod (a Service reaches its
first pod), and volume mounts become temporary directories. Workloads that are not kvmesh
(etcd) are replaced by real servers. A pod is ready when its readiness probe passes: a `grpc:`
probe is a health check on its port, an `exec:` probe (`kvmesh health` over mutual TLS) runs the
command with the pod's environment, as the kubelet would in the container.

cert-manager is stood in for too: every `Certificate` becomes its Secret's files (tls.crt, tls.key,
ca.crt), issued by a CA made here with the Certificate's commonName, DNS names and IPs, and Secret
and ConfigMap volumes become folders holding those files (`LocalKube.issue` makes further
certificates from the same CA, for a test's own client).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from kvmesh.security.tls import ClientTLS, TLSFiles
from kvmesh.tools.certs import CA, issue, make_ca
from kvmesh.tools.cli.health import check
from kvmesh.tools.processes import KvmeshProcess, kvmesh_env
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
        """The gRPC port: the `grpc:` probe's, else the container port named grpc (exec probes)."""
        probe = self.container.get("readinessProbe", {})
        if "grpc" in probe:
            return int(probe["grpc"]["port"])
        ports = [p["containerPort"] for p in self.container.get("ports", []) if p.get("name") == "grpc"]
        return int(ports[0]) if ports else None


class LocalKube:
    """Kubernetes workloads as local processes.

    `infra` maps (service name, port) to the address of a real server standing in for an
    in-cluster workload that is not kvmesh (etcd); `secrets` maps (Secret, key) to its value.
    """

    def __init__(self, objs: list[dict[str, Any]], workdir: Path, infra: dict[tuple[str, int], str],
                 secrets: dict[tuple[str, str], str] | None = None) -> None:
        self.workdir = workdir
        self.configmaps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "ConfigMap"}
        self.ca: CA | None = None
        self.tls_secrets: dict[str, Path] = {}
        certificates = [o for o in objs if o["kind"] == "Certificate" and not o["spec"].get("isCA")]
        if certificates:
            self.ca = make_ca(workdir / "cert-manager", "local cert-manager CA")
            for cert in certificates:
                spec = cert["spec"]
                self.tls_secrets[spec["secretName"]] = self.issue(
                    spec["commonName"], [*spec.get("dnsNames", []), *spec.get("ipAddresses", [])], spec["secretName"])
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

    def issue(self, common_name: str, hosts: list[str], secret: str) -> Path:
        """A Secret's files as cert-manager writes them (tls.crt, tls.key, ca.crt), from the local CA."""
        assert self.ca is not None, "no Certificate in these objects"
        folder = self.workdir / "cert-manager" / secret
        issued = issue(self.ca, common_name, folder, hosts=hosts, stem="tls")
        issued.cert.rename(folder / "tls.crt")
        issued.key.rename(folder / "tls.key")
        shutil.copy(self.ca.cert_path, folder / "ca.crt")
        return folder

    def client_tls(self, common_name: str) -> ClientTLS:
        """A client certificate from the local CA, expecting the name every member certificate carries
        (the server-name override the pods' own channels use, from the pods' environment)."""
        folder = self.issue(common_name, [], f"client-{common_name}")
        names = {p.env.get("KVMESH_TLS_SERVER_NAME") for p in self.pods} - {None}
        return ClientTLS(TLSFiles(tls_cert=folder / "tls.crt", tls_key=folder / "tls.key", tls_ca=folder / "ca.crt",
                                  tls_server_name=names.pop() if names else None))

    def _fill_volumes(self, pod: Pod) -> None:
        """Secret and ConfigMap volumes as folders holding their files, where `_rewrite` maps the mounts."""
        volumes = {v["name"]: v for v in pod.workload["spec"]["template"]["spec"].get("volumes", [])}
        for mount in pod.container.get("volumeMounts", []):
            volume = volumes.get(mount["name"], {})  # a volumeClaimTemplate: an empty folder
            here = self.workdir / pod.name / mount["name"]
            here.mkdir(parents=True, exist_ok=True)
            if "secret" in volume and volume["secret"]["secretName"] in self.tls_secrets:
                shutil.copytree(self.tls_secrets[volume["secret"]["secretName"]], here, dirs_exist_ok=True)
            elif "configMap" in volume:
                for key, value in self.configmaps[volume["configMap"]["name"]]["data"].items():
                    (here / key).write_text(value)

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
        places: dict[str, str] = {}
        for mount in pod.container.get("volumeMounts", []):
            here = self.workdir / pod.name / mount["name"]
            here.mkdir(parents=True, exist_ok=True)
            places[mount["mountPath"]] = str(here)
        if not places:
            return value
        # One pass over every mount point (longest first), so a replaced path is never replaced again.
        targets = "|".join(re.escape(m) for m in sorted(places, key=len, reverse=True))
        return re.sub(rf"(?:^|(?<=://)|(?<==))({targets})(?=$|[/?,])", lambda m: places[m.group(1)], value)

    def env(self, pod: Pod) -> dict[str, str]:
        """The pod's environment with cluster names, ports and mounts made local."""
        return {k: self._rewrite(pod, v) for k, v in pod.env.items()}

    def start(self, pod: Pod) -> KvmeshProcess:
        self._fill_volumes(pod)
        env = self.env(pod)
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
            wait_for(functools.partial(self.ready, pod), f"{pod.name} readiness probe", timeout=timeout)

    def ready(self, pod: Pod) -> bool:
        """The pod's readiness probe: `grpc:` as the kubelet checks it, `exec:` run in the pod's environment."""
        probe_spec = pod.container.get("readinessProbe", {})
        if "exec" in probe_spec:
            command = probe_spec["exec"]["command"]
            assert command[0] == "kvmesh", command
            done = subprocess.run([sys.executable, "-m", "kvmesh", *command[1:]], capture_output=True, text=True,
                                  env=kvmesh_env(self.env(pod)), timeout=60)
            return done.returncode == 0
        return probe(self.local(pod))


def probe(address: str) -> bool:
    """What the kubelet's `grpc:` probe checks: grpc.health.v1 says SERVING."""
    return check(address, timeout=3)[0]
