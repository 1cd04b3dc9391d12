"""The policy's pure decisions: register only yourself, capacity bound, namespaces, events,
metadata prefixes, admin; and the file: YAML or JSON, hashed tokens, reload on change."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from kvmesh.security.identity import BadCredentials, Principal, authenticate, bearer_token, token_digest
from kvmesh.security.policy import (
    Policy,
    PolicyError,
    PolicyFile,
    allows_events,
    allows_metadata,
    allows_namespace,
    allows_register,
    allows_route,
    is_admin,
    parse_policy,
)

TOKEN = "tenant-a-secret-token"
POLICY_YAML = f"""
principals:
  cachenode-*:
    register: {{roles: [cachenode], members: [self], max_capacity_bytes: 1GiB}}
  engine-*:
    register: {{roles: [engine], members: [self]}}
    events: [self]
    route: true
    namespaces: {{read: [shared], write: [shared]}}
  tenant-a:
    tokens_sha256: [{token_digest(TOKEN)}]
    namespaces: {{read: [tenant-a, shared], write: [tenant-a]}}
    metadata: {{read: [config/], write: [config/tenant-a/]}}
  ops:
    admin: true
"""


def who(name: str) -> Principal:
    return Principal(name, "certificate")


@pytest.fixture
def policy() -> Policy:
    return parse_policy(POLICY_YAML)


def test_a_cache_node_registers_only_itself_only_as_a_cache_node(policy: Policy) -> None:
    node = who("cachenode-0")
    assert allows_register(policy, node, "cachenode-0", "cachenode", 1024)
    take_over = allows_register(policy, node, "cachenode-1", "cachenode", 1024)
    assert not take_over and "may not register 'cachenode-1'" in take_over.reason
    assert not allows_register(policy, node, "cachenode-0", "router")
    assert not allows_register(policy, node, "engine-0", "engine")
    assert not allows_register(policy, who("engine-0"), "cachenode-0", "cachenode")


def test_capacity_is_bounded(policy: Policy) -> None:
    node = who("cachenode-3")
    assert allows_register(policy, node, "cachenode-3", "cachenode", 1024**3)
    fake = allows_register(policy, node, "cachenode-3", "cachenode", 2**64 - 1)
    assert not fake and "at most 1073741824" in fake.reason
    # An engine's grant sets no bound: any capacity (engines register none anyway).
    assert allows_register(policy, who("engine-1"), "engine-1", "engine", 2**40)


def test_namespaces_are_read_and_write_separately(policy: Policy) -> None:
    tenant = Principal("tenant-a", "token")
    assert allows_namespace(policy, tenant, "tenant-a", write=True)
    assert allows_namespace(policy, tenant, "shared", write=False)
    assert not allows_namespace(policy, tenant, "shared", write=True)
    assert not allows_namespace(policy, tenant, "tenant-b", write=False)
    assert not allows_namespace(policy, tenant, "tenant-a2", write=False)  # names, not prefixes
    assert not allows_namespace(policy, who("cachenode-0"), "tenant-a", write=False)


def test_events_only_for_the_reporting_pod(policy: Policy) -> None:
    assert allows_events(policy, who("engine-0"), "engine-0")
    assert not allows_events(policy, who("engine-0"), "engine-1")
    assert not allows_events(policy, who("cachenode-0"), "cachenode-0")


def test_metadata_prefixes(policy: Policy) -> None:
    tenant = Principal("tenant-a", "token")
    assert allows_metadata(policy, tenant, "config/models", write=False)
    assert not allows_metadata(policy, tenant, "config/models", write=True)
    assert allows_metadata(policy, tenant, "config/tenant-a/x", write=True)
    assert not allows_metadata(policy, tenant, "members/cachenode-0", write=False)
    assert not allows_metadata(policy, who("engine-0"), "config/models", write=False)


def test_admin_may_do_everything_and_nobody_else_is_admin(policy: Policy) -> None:
    ops = who("ops")
    assert is_admin(policy, ops)
    assert allows_register(policy, ops, "anything", "router", 2**64 - 1)
    assert allows_namespace(policy, ops, "tenant-b", write=True)
    assert allows_metadata(policy, ops, "members/x", write=True)
    assert allows_events(policy, ops, "engine-9")
    assert not is_admin(policy, who("cachenode-0"))
    assert not is_admin(policy, Principal("tenant-a", "token"))


def test_unknown_and_missing_principals_get_nothing(policy: Policy) -> None:
    stranger = who("stranger")
    for decision in (allows_register(policy, stranger, "stranger", "cachenode"),
                     allows_namespace(policy, stranger, "shared", write=False),
                     allows_events(policy, stranger, "stranger"),
                     allows_metadata(policy, stranger, "", write=False),
                     allows_route(policy, stranger), is_admin(policy, stranger)):
        assert not decision
    for decision in (allows_register(policy, None, "x", "cachenode"), allows_namespace(policy, None, "shared", False),
                     allows_route(policy, None)):
        assert not decision and decision.reason == "no authenticated principal"
    assert allows_route(policy, who("engine-7"))


def test_tokens_are_stored_hashed_and_map_to_their_principal(policy: Policy) -> None:
    assert policy.tokens == {token_digest(TOKEN): "tenant-a"}
    assert TOKEN not in POLICY_YAML
    found = authenticate({}, [("authorization", f"Bearer {TOKEN}")], policy.tokens)
    assert found == Principal("tenant-a", "token")
    with pytest.raises(BadCredentials):
        authenticate({}, [("authorization", "Bearer not-the-token")], policy.tokens)
    with pytest.raises(BadCredentials):
        bearer_token([("authorization", "Basic dXNlcjpwdw==")])
    # A certificate's common name when there is no token; nothing at all is None.
    assert authenticate({"x509_common_name": [b"cachenode-0"]}, [], policy.tokens) == who("cachenode-0")
    assert authenticate({}, [], policy.tokens) is None


def test_bad_policies_are_refused() -> None:
    with pytest.raises(PolicyError, match="SHA-256"):
        parse_policy('{"principals": {"a": {"tokens_sha256": ["plain-token"]}}}')
    with pytest.raises(PolicyError, match="both"):
        d = "a" * 64
        parse_policy(f'{{"principals": {{"a": {{"tokens_sha256": ["{d}"]}}, "b": {{"tokens_sha256": ["{d}"]}}}}}}')
    with pytest.raises(PolicyError):
        parse_policy("principals: {a: {register: {roles: [superuser]}}}")
    with pytest.raises(PolicyError):
        parse_policy("principals: {a: {unknown_grant: true}}")
    with pytest.raises(PolicyError, match="not YAML or JSON"):
        parse_policy("principals: [unclosed")


def test_policy_file_reloads_on_change_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text('{"principals": {"ops": {"admin": true}}}')
    source = PolicyFile(path, check_seconds=0.0)
    assert is_admin(source.current(), who("ops"))
    path.write_text("principals:\n  root:\n    admin: true\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert is_admin(source.current(), who("root")) and not is_admin(source.current(), who("ops"))
    path.write_text("principals: [broken")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 2 * 10**9))
    assert is_admin(source.current(), who("root"))  # still the previous policy
