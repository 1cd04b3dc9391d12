"""cert-manager's `Issuer` and `Certificate` (cert-manager.io/v1), for validating manifests offline.

kubernetes-validate ships only Kubernetes' own schemas, so these custom resources would pass
unchecked. As with the KVCachePool CRD (tests/operator/schema_tools.py), each is checked against an
openAPIV3Schema the way the API server's strict field validation would: unknown fields refused,
types and enums checked. The schemas cover the fields kvmesh's manifests may use, written from
cert-manager's v1 API reference; a field outside them fails the test, which is the point.
"""

from __future__ import annotations

from typing import Any

import jsonschema

from tests.operator.schema_tools import to_json_schema

Schema = dict[str, Any]

_STRINGS: Schema = {"type": "array", "items": {"type": "string"}}
_ISSUER_REF: Schema = {
    "type": "object", "required": ["name"],
    "properties": {"name": {"type": "string"}, "kind": {"type": "string", "enum": ["Issuer", "ClusterIssuer"]},
                   "group": {"type": "string"}},
}
_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
           "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any",
           "server auth", "client auth", "code signing", "email protection", "s/mime", "ipsec end system",
           "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}

CERTIFICATE_SPEC: Schema = {
    "type": "object", "required": ["secretName", "issuerRef"],
    "properties": {
        "secretName": {"type": "string"},
        "commonName": {"type": "string", "maxLength": 64},
        "dnsNames": _STRINGS,
        "ipAddresses": _STRINGS,
        "uris": _STRINGS,
        "isCA": {"type": "boolean"},
        "usages": {"type": "array", "items": {"type": "string", "enum": _USAGES}},
        "duration": _DURATION,
        "renewBefore": _DURATION,
        "privateKey": {"type": "object", "properties": {
            "algorithm": {"type": "string", "enum": ["RSA", "ECDSA", "Ed25519"]},
            "size": {"type": "integer"},
            "encoding": {"type": "string", "enum": ["PKCS1", "PKCS8"]},
            "rotationPolicy": {"type": "string", "enum": ["Never", "Always"]},
        }},
        "issuerRef": _ISSUER_REF,
    },
}
ISSUER_SPEC: Schema = {
    "type": "object",
    "properties": {
        "selfSigned": {"type": "object", "properties": {"crlDistributionPoints": _STRINGS}},
        "ca": {"type": "object", "required": ["secretName"], "properties": {
            "secretName": {"type": "string"}, "crlDistributionPoints": _STRINGS}},
    },
    "minProperties": 1, "maxProperties": 1,  # exactly one issuer type
}
_METADATA: Schema = {"type": "object", "required": ["name"], "properties": {
    "name": {"type": "string"}, "namespace": {"type": "string"},
    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    "ownerReferences": {"type": "array", "items": {  # the operator's Certificates belong to their pool
        "type": "object", "required": ["apiVersion", "kind", "name", "uid"],
        "properties": {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "name": {"type": "string"},
                       "uid": {"type": "string"}, "controller": {"type": "boolean"},
                       "blockOwnerDeletion": {"type": "boolean"}}}},
}}
# A ClusterIssuer has an Issuer's spec (the operator's cluster-issuer.yaml uses one).
KINDS = {"Certificate": CERTIFICATE_SPEC, "Issuer": ISSUER_SPEC, "ClusterIssuer": ISSUER_SPEC}


def is_cert_manager(obj: dict[str, Any]) -> bool:
    return str(obj.get("apiVersion", "")).startswith("cert-manager.io/")


def validate(obj: dict[str, Any]) -> None:
    """Raises jsonschema.ValidationError when `obj` is not a valid cert-manager.io/v1 resource."""
    schema: Schema = {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": {"type": "string", "enum": ["cert-manager.io/v1"]},
                       "kind": {"type": "string", "enum": sorted(KINDS)}, "metadata": _METADATA,
                       "spec": KINDS.get(obj.get("kind", ""), {"type": "object"})},
    }
    jsonschema.Draft4Validator(to_json_schema(schema)).validate(obj)
