"""deploy/compose/docker-compose.yml is accepted by Docker Compose v2 and has the promised shape,
mutual TLS and the policy included."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kvmesh.security.identity import Principal
from kvmesh.security.policy import parse_policy
from tests.deploy.compose import COMPOSE_DIR, COMPOSE_FILE, PROFILES, ROOT, resolved_config, run_compose

KVMESH_SERVICES = {"metadata", "cachenode", "router", "enginesim"}


def test_compose_config_accepts_the_file() -> None:
    for profile in (None, *PROFILES):
        done = run_compose("config", "--quiet", profile=profile)
        assert done.returncode == 0, (profile, done.stderr)


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The check has teeth: an unknown depends_on condition is refused."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_FILE.read_text().replace("condition: service_healthy", "condition: when_ready", 1))
    done = run_compose("config", "--quiet", compose_file=broken)
    assert done.returncode != 0 and "condition value must be one of" in done.stderr


@pytest.mark.parametrize("profile", [None, *PROFILES])
def test_profiles_select_the_metadata_backend(profile: str | None) -> None:
    services = resolved_config(profile)["services"]
    backend_service = "redis" if profile == "redis" else "etcd"
    other = "etcd" if backend_service == "redis" else "redis"
    assert backend_service in services and other not in services
    metadata = {n: s for n, s in services.items() if s.get("command") == ["metadata"]}
    assert len(metadata) == 2
    for svc in metadata.values():
        assert svc["environment"]["KVMESH_BACKEND"].startswith(f"{backend_service}://{backend_service}:")
        assert svc["depends_on"][backend_service]["condition"] == "service_healthy"
    # Members reach the pair by the same names whatever the profile (aliases under redis).
    names = set()
    for name, svc in metadata.items():
        names.add(name)
        names |= set((svc.get("networks", {}).get("default") or {}).get("aliases", []))
    assert {"metadata-1", "metadata-2"} <= names
    roles = [s["command"][0] for s in services.values() if "command" in s and s.get("image", "").startswith("kvmesh/")]
    assert sorted(roles) == sorted(["metadata"] * 2 + ["cachenode"] * 3 + ["router"] + ["enginesim"] * 2 + ["bench"])


def test_services_are_configured_by_env_and_health_checked() -> None:
    config = resolved_config()
    services = config["services"]
    for name, svc in services.items():
        if not svc.get("image", "").startswith("kvmesh/"):
            continue
        assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile", name
        assert all(k.startswith("KVMESH_") for k in svc.get("environment", {})), name
        if svc["command"][0] in KVMESH_SERVICES:
            assert svc["command"] == [svc["command"][0]], f"{name}: service settings go through KVMESH_* env"
            assert svc["healthcheck"]["test"][:3] == ["CMD", "kvmesh", "health"], name
            assert svc["environment"]["KVMESH_LISTEN"].startswith("0.0.0.0:"), name
        else:  # the one-shot job: a tool with flags, tunable through compose variables
            assert svc["restart"] == "no" and svc["healthcheck"]["disable"] is True
            assert "--speedup=10" in svc["command"] and "--router=router:7600" in svc["command"]
            for sim in ("enginesim-1", "enginesim-2"):
                assert services[sim]["environment"]["KVMESH_SPEEDUP"] == "10", "engines and replay share a clock"
        for dep, how in svc.get("depends_on", {}).items():
            if how.get("required", True):
                assert dep in services, (name, dep)
            assert how["condition"] == "service_healthy", (name, dep)
    for i in (1, 2, 3):
        node = services[f"cachenode-{i}"]
        volume = next(v for v in node["volumes"] if v["target"] == "/data")
        assert volume["type"] == "volume" and volume["source"] == f"cachenode-{i}-data"
        assert volume["source"] in config["volumes"]
        tiers = node["environment"]["KVMESH_STORAGE"].split(",")
        assert tiers[0].startswith("memory://") and tiers[1].startswith("disk:///data")


@pytest.mark.parametrize("profile", PROFILES)
def test_every_service_runs_mutual_tls_with_its_own_certificate_and_the_policy(profile: str) -> None:
    """Secure by default: each kvmesh container serves and dials mutual TLS with its own folder of
    certificates mounted read-only, and enforces the mounted policy; Envoy presents its own
    certificate to the picker and checks the router's."""
    services = resolved_config(profile)["services"]
    policy = parse_policy((COMPOSE_DIR / "policy" / "policy.yaml").read_text())
    for name, svc in services.items():
        if not svc.get("image", "").startswith("kvmesh/"):
            continue
        env = svc["environment"]
        mounts = {v["target"]: v for v in svc.get("volumes", [])}
        certs = mounts["/certs"]
        assert certs["type"] == "bind" and certs["read_only"] is True, name
        identity = Path(certs["source"]).name  # the folder scripts/compose_certs.sh writes per identity
        assert env["KVMESH_TLS_CERT"] == f"/certs/{identity}.pem", name
        assert env["KVMESH_TLS_KEY"] == f"/certs/{identity}-key.pem", name
        assert env["KVMESH_TLS_CA"] == "/certs/ca.pem", name
        # Each identity is granted something, but the metadata replicas (they call no one).
        granted = policy.grants(Principal(identity, "certificate"))
        assert bool(granted) == (svc["command"][0] != "metadata"), (name, identity, granted)
        if svc["command"][0] in KVMESH_SERVICES:
            assert env["KVMESH_TLS_REQUIRE_CLIENT_CERT"] == "true", name
            assert env["KVMESH_SECURITY_POLICY"] == "/etc/kvmesh/policy.yaml", name
            assert mounts["/etc/kvmesh"]["source"] == str(COMPOSE_DIR / "policy"), name
            assert mounts["/etc/kvmesh"]["read_only"] is True, name
        if name.startswith("metadata-redis-"):  # reached as metadata-N: it holds metadata-N's certificate
            assert identity == name.replace("metadata-redis-", "metadata-")
        elif svc["command"][0] != "bench":
            assert identity == name == env.get("KVMESH_MEMBER_ID", name), name
    gateway = services["gateway"]
    mounts = {v["target"]: v for v in gateway["volumes"]}
    assert Path(mounts["/certs"]["source"]).name == "gateway" and mounts["/certs"]["read_only"] is True
    envoy = yaml.safe_load((COMPOSE_DIR / "envoy.yaml").read_text())
    picker = next(c for c in envoy["static_resources"]["clusters"] if c["name"] == "kvmesh_picker")
    tls = picker["transport_socket"]["typed_config"]
    assert tls["sni"] == "router"
    common = tls["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"]["filename"] == "/certs/gateway.pem"
    assert common["validation_context"]["trusted_ca"]["filename"] == "/certs/ca.pem"
    assert common["validation_context"]["match_typed_subject_alt_names"][0]["matcher"] == {"exact": "router"}
    # The script issues exactly the identities the compose file mounts (and `ops`, for a person).
    script = (ROOT / "scripts" / "compose_certs.sh").read_text()
    issued = set(script.split("services=(", 1)[1].split(")", 1)[0].split())
    mounted = {Path(v["source"]).name for s in services.values() for v in s.get("volumes", [])
               if v["target"] == "/certs"}
    assert issued >= mounted | {"ops"}, (issued, mounted)
