"""The KVCachePool CRD: valid for Kubernetes, structural, defaults like the operator, rejects bad specs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from kvmesh.services.operator.spec import API_VERSION, GROUP, KIND, PLURAL, VERSION, SpecError, parse_spec
from tests.deploy.k8s import KUBE_VERSIONS, validate_cli
from tests.operator.schema_tools import admit, apply_defaults, structural_problems

OPERATOR = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "operator"
CRD_PATH = OPERATOR / "crd.yaml"
EXAMPLES = sorted((OPERATOR / "examples").glob("*.yaml"))


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD_PATH.read_text()))


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def _pool(spec: dict[str, Any], name: str = "pool") -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name, "namespace": "ns"}, "spec": spec}


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_crd_passes_strict_validation(version: str) -> None:
    done = validate_cli(CRD_PATH, version)
    assert done.returncode == 0, done.stdout + done.stderr


def test_crd_names_match_the_operator(crd) -> None:
    assert crd["spec"]["group"] == GROUP and crd["spec"]["names"]["plural"] == PLURAL
    assert crd["spec"]["names"]["kind"] == KIND and crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    version = crd["spec"]["versions"][0]
    assert version["name"] == VERSION and version["storage"] and version["served"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"]["specReplicasPath"] == ".spec.replicas"


def test_schema_is_structural(crd) -> None:
    assert structural_problems(_schema(crd)) == []


def test_structural_check_catches_violations(crd) -> None:
    """The checker has teeth: the usual mistakes are reported."""
    schema = copy.deepcopy(_schema(crd))
    spec = schema["properties"]["spec"]
    del spec["properties"]["replicas"]["type"]
    spec["properties"]["service"]["additionalProperties"] = {"type": "string"}
    spec["properties"]["metadata"]["oneOf"][0]["type"] = "object"
    spec["properties"]["service"]["properties"]["port"]["default"] = 0
    problems = "\n".join(structural_problems(schema))
    for expected in ("replicas: no type", "mutually exclusive", "not allowed in a logical junctor",
                     "default is invalid"):
        assert expected in problems


def test_defaults_agree_with_the_operator(crd) -> None:
    """The API server's defaults (from the CRD) and the operator's (pydantic) are the same values."""
    defaulted = admit(crd, _pool({}))["spec"]
    model = parse_spec({}).model_dump(by_alias=True, exclude_none=True)
    assert defaulted == model
    # Secure by default: TLS on, certificates from the cluster's kvmesh-ca ClusterIssuer.
    assert defaulted["tls"] == {"enabled": True, "issuerRef": {"name": "kvmesh-ca", "kind": "ClusterIssuer",
                                                               "group": "cert-manager.io"}}
    assert defaulted["replicas"] == 3 and defaulted["metadata"] == {"managed": {"replicas": 1,
           "image": "quay.io/coreos/etcd:v3.5.15", "storage": "1Gi"}, "replicas": 2}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.stem)
def test_examples_are_admitted_and_parsed(crd, example: Path) -> None:
    obj = yaml.safe_load(example.read_text())
    defaulted = admit(crd, obj)
    spec = parse_spec(defaulted["spec"])
    assert spec.model_dump(by_alias=True, exclude_none=True) == parse_spec(obj["spec"]).model_dump(
        by_alias=True, exclude_none=True)


BAD_SPECS: dict[str, dict[str, Any]] = {
    "negative replicas": {"replicas": -1},
    "both etcd and redis": {"metadata": {"etcd": {"endpoints": ["e:2379"]}, "redis": {"address": "r:6379"}}},
    "managed and etcd": {"metadata": {"managed": {}, "etcd": {"endpoints": ["e:2379"]}}},
    "no backend": {"metadata": {"replicas": 2}},
    "unknown top field": {"replica": 3},
    "unknown nested field": {"cache": {"engines": "memory://"}},
    "unknown backend field": {"metadata": {"redis": {"address": "r:6379", "password": "x"}}},
    "bad service type": {"service": {"type": "Ingress"}},
    "port zero": {"service": {"port": 0}},
    "engine without scheme": {"cache": {"engine": "lots-of-ram"}},
    "etcd endpoint without port": {"metadata": {"etcd": {"endpoints": ["etcd.infra"]}}},
    "empty etcd endpoints": {"metadata": {"etcd": {"endpoints": []}}},
    "redis db out of range": {"metadata": {"redis": {"address": "r:6379", "db": 16}}},
    "secret ref without key": {"metadata": {"redis": {"address": "r:6379", "passwordSecretRef": {"name": "s"}}}},
    "three etcd members or one": {"metadata": {"managed": {"replicas": 2}}},
    "bad quantity": {"cache": {"storage": {"size": "ten gigs"}}},
    "replicas not an integer": {"replicas": "3"},
    "unknown issuer kind": {"tls": {"issuerRef": {"kind": "Vault"}}},
    "tls enabled not a boolean": {"tls": {"enabled": "no"}},
    "unknown tls field": {"tls": {"insecure": True}},
    "empty issuer name": {"tls": {"issuerRef": {"name": ""}}},
}


@pytest.mark.parametrize("name", sorted(BAD_SPECS))
def test_bad_specs_are_rejected_by_the_schema_and_the_operator(crd, name: str) -> None:
    spec = BAD_SPECS[name]
    with pytest.raises(jsonschema.ValidationError):
        admit(crd, _pool(spec))
    with pytest.raises(SpecError):
        parse_spec(apply_defaults(_schema(crd)["properties"]["spec"], spec))


def test_pool_names_are_bounded(crd) -> None:
    admit(crd, _pool({}, name="p" * 40))
    with pytest.raises(jsonschema.ValidationError):
        admit(crd, _pool({}, name="p" * 41))


def test_an_opt_out_stays_an_opt_out(crd) -> None:
    """Defaulting fills the issuer but never turns TLS back on."""
    defaulted = admit(crd, _pool({"tls": {"enabled": False}}))["spec"]
    assert defaulted["tls"]["enabled"] is False and not parse_spec(defaulted).tls.enabled


def test_operator_rejects_what_only_it_can_check() -> None:
    """Engine schemes and URI syntax are beyond a regex: the operator refuses them (status Failed)."""
    with pytest.raises(SpecError, match="unknown storage scheme"):
        parse_spec({"cache": {"engine": "memory://?capacity=1GiB,tape:///dev/st0"}})
    with pytest.raises(SpecError, match="capacity"):
        parse_spec({"cache": {"engine": "memory://?capacity=lots"}})
    # Client grants are free-form to the schema; the operator parses them as a kvmesh policy.
    bad_grant = {"policy": {"principals": {"vllm": {"namespaces": {"read": "kvmesh", "wrte": []}}}}}
    with pytest.raises(SpecError, match="wrte"):
        parse_spec(bad_grant)
