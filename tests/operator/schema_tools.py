"""What the API server does with a CRD's openAPIV3Schema, reproduced for tests without a cluster.

- `structural_problems`: the structural-schema rules the API server enforces on a CRD
  (every node has a type, no additionalProperties next to properties, logical junctors carry
  only value validations, int-or-string spelled the canonical way, defaults valid).
- `apply_defaults`: top-down defaulting, as the API server does on create and read.
- `to_json_schema`: the schema as JSON Schema (draft 4, which OpenAPI v3 schemas follow) with
  `additionalProperties: false` wherever `properties` are listed, which is what strict field
  validation (`kubectl apply` since 1.27) does with unknown fields; validated with `jsonschema`.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema

Schema = dict[str, Any]
JUNCTORS = ("oneOf", "anyOf", "allOf", "not")
FORBIDDEN_IN_JUNCTORS = ("type", "additionalProperties", "description", "default", "nullable")


def structural_problems(schema: Schema, path: str = "") -> list[str]:
    problems: list[str] = []
    int_or_string = schema.get("x-kubernetes-int-or-string") is True
    preserve = schema.get("x-kubernetes-preserve-unknown-fields") is True
    if "type" not in schema and not int_or_string and not preserve:
        problems.append(f"{path or '<root>'}: no type")
    if int_or_string and "anyOf" in schema and schema["anyOf"] != [{"type": "integer"}, {"type": "string"}]:
        problems.append(f"{path}: int-or-string must use anyOf [integer, string]")
    if "properties" in schema and "additionalProperties" in schema:
        problems.append(f"{path}: properties and additionalProperties are mutually exclusive")
    for junctor in JUNCTORS:
        branches = schema.get(junctor)
        if branches is None:
            continue
        for i, branch in enumerate(branches if isinstance(branches, list) else [branches]):
            if int_or_string and junctor == "anyOf":
                continue
            for bad in FORBIDDEN_IN_JUNCTORS:
                if bad in branch:
                    problems.append(f"{path}.{junctor}[{i}]: {bad} is not allowed in a logical junctor")
            for key in branch:
                if key.startswith("x-kubernetes-"):
                    problems.append(f"{path}.{junctor}[{i}]: {key} is not allowed in a logical junctor")
            for name in branch.get("required", []):
                if name not in schema.get("properties", {}):
                    problems.append(f"{path}.{junctor}[{i}]: requires unknown property {name}")
    for name, sub in schema.get("properties", {}).items():
        problems += structural_problems(sub, f"{path}.{name}")
    if isinstance(schema.get("additionalProperties"), dict):
        problems += structural_problems(schema["additionalProperties"], f"{path}[*]")
    if "items" in schema:
        problems += structural_problems(schema["items"], f"{path}[]")
    if "default" in schema:
        try:
            jsonschema.Draft4Validator(to_json_schema(schema)).validate(apply_defaults(schema, schema["default"]))
        except jsonschema.ValidationError as exc:
            problems.append(f"{path}: default is invalid: {exc.message}")
    return problems


def apply_defaults(schema: Schema, value: Any) -> Any:
    """Fills absent fields with their schema defaults, recursively (a default is itself defaulted)."""
    if not isinstance(value, dict) or "properties" not in schema:
        if isinstance(value, list) and "items" in schema:
            return [apply_defaults(schema["items"], v) for v in value]
        return value
    out = dict(value)
    for name, sub in schema["properties"].items():
        if name not in out and "default" in sub:
            out[name] = copy.deepcopy(sub["default"])
        if name in out:
            out[name] = apply_defaults(sub, out[name])
    return out


def to_json_schema(schema: Schema) -> Schema:
    out: Schema = {}
    for k, v in schema.items():
        if k.startswith("x-kubernetes-") or k in ("default", "description", "format"):
            continue
        if k == "properties":
            out[k] = {name: to_json_schema(sub) for name, sub in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = to_json_schema(v)
        elif k in ("oneOf", "anyOf", "allOf"):
            out[k] = [to_json_schema(b) for b in v]
        else:
            out[k] = v
    if "properties" in schema and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    if schema.get("x-kubernetes-int-or-string") and "pattern" in out:
        # The pattern applies to the string form only.
        out = {"anyOf": [{"type": "integer"}, {"type": "string", "pattern": out.pop("pattern")}]}
    return out


def admit(crd: dict[str, Any], obj: dict[str, Any]) -> dict[str, Any]:
    """Defaults then validates a custom resource the way the API server would; returns it defaulted."""
    version = crd["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]
    defaulted = apply_defaults(schema, obj)
    checked = to_json_schema(schema)
    # metadata is ObjectMeta, validated by the API server itself; the CRD only bounds the name.
    checked["properties"]["metadata"]["additionalProperties"] = True
    jsonschema.Draft4Validator(checked).validate(defaulted)
    return dict(defaulted)
