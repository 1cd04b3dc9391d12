"""The rendered `demo` overlay, run as local pods (tests/deploy/local_kube.py): the manifests' wiring
(names, ports, variables, probes, certificates, the policy) cannot drift from the code without this
test failing. The pods run on mutual TLS from their Certificates' Secrets (issued here in
cert-manager's place) and the policy ConfigMap; the test's client holds a `kvmesh-admin`
certificate, as a person would; a plaintext client is refused.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.tools.testing.servers import ServerHandle, etcd_server
from tests.deploy.k8s import K8S, documents, render
from tests.deploy.local_kube import LocalKube
from tests.deploy.mesh_checks import expect_members, expect_plaintext_refused, expect_round_trip, expect_route

# Start order (Kubernetes has none: members retry; starting in waves keeps the test short).
WAVES = (("metadata",), ("cachenode", "router"), ("enginesim",), ("bench",))


@pytest.fixture
def etcd_for_kube() -> Iterator[ServerHandle]:
    with etcd_server() as handle:
        yield handle


@pytest.mark.integration
@pytest.mark.timeout(240)
def test_demo_overlay_runs_as_local_pods(etcd_for_kube: ServerHandle, tmp_path: Path) -> None:
    objs = documents(render(K8S / "overlays" / "demo"))
    # The Envoy gateway is not a kvmesh workload and is not run here: its config is run by real
    # Envoy in tests/integrations/test_envoy_gateway.py. Nothing in the mesh dials it.
    kube = LocalKube(objs, tmp_path, {("kvmesh-etcd", 2379): etcd_for_kube.address,
                                      ("kvmesh-gateway", 8080): "127.0.0.1:9"})
    assert sorted({p.component for p in kube.pods}) == ["bench", "cachenode", "enginesim", "metadata", "router"]
    assert {c for wave in WAVES for c in wave} == {p.component for p in kube.pods}
    tls = kube.client_tls("kvmesh-admin")
    try:
        for wave in WAVES[:-1]:
            kube.start_ready([p for p in kube.pods if p.component in wave])

        # Members registered under their pod names and advertised addresses, via the metadata Service.
        cachenodes = {p.name: kube.local(p) for p in kube.of("cachenode")}
        engines = {p.name: kube.local(p) for p in kube.of("enginesim")}
        assert sorted(cachenodes) == ["kvmesh-cachenode-0", "kvmesh-cachenode-1", "kvmesh-cachenode-2"]
        for pod in kube.of("metadata"):
            expect_members(kube.local(pod), cachenodes, engines, tls=tls)
        expect_route(kube.addresses[("kvmesh-router", 7600)], engines, tls=tls)
        for name, address in cachenodes.items():
            expect_round_trip(address, name, min_tiers=2, tls=tls)
        for pod in kube.pods:
            if pod.component != "bench":
                expect_plaintext_refused(kube.local(pod))

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
