"""The security flags: every service has them, they come from flags or KVMESH_* variables, and
inconsistent ones are refused with one clear line (exit 2) instead of starting half secure."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.security.settings import SecuritySettings
from kvmesh.services.metadata.settings import MetadataSettings
from tests.security.conftest import Pki


def _parse(argv: list[str]) -> MetadataSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, MetadataSettings)
    return settings_from_args(MetadataSettings, parser.parse_args(argv))


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TLS_CERT", "TLS_KEY", "TLS_CA", "AUTH_TOKEN_FILE", "SECURITY_POLICY"):
        monkeypatch.delenv(f"KVMESH_{name}", raising=False)
    settings = _parse([])
    assert not settings.server_enabled and not settings.client_enabled
    assert settings.security_policy is None and settings.tls_require_client_cert


def test_flags_and_environment(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> None:
    cert = pki.issue("metadata")
    settings = _parse(["--tls-cert", str(cert.cert), "--tls-key", str(cert.key), "--tls-ca", str(pki.ca.cert_path),
                       "--no-tls-require-client-cert"])
    assert settings.server_enabled and settings.client_enabled and not settings.tls_require_client_cert
    monkeypatch.setenv("KVMESH_TLS_CA", str(pki.ca.cert_path))
    monkeypatch.setenv("KVMESH_TLS_SERVER_NAME", "metadata.kvmesh")
    tool = SecuritySettings()  # a tool that is not a service reads its environment
    assert tool.client_enabled and tool.tls_ca == pki.ca.cert_path and tool.tls_server_name == "metadata.kvmesh"


@pytest.mark.parametrize("argv, message", [
    (["--tls-cert", "{cert}"], "--tls-cert and --tls-key go together"),
    (["--tls-cert", "{cert}", "--tls-key", "{key}"], "--tls-require-client-cert needs --tls-ca"),
    (["--tls-ca", "{missing}"], "no such file"),
    (["--auth-token-file", "{cert}"], "needs --tls-ca"),
])
def test_inconsistent_settings_exit_2_with_one_line(pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     argv: list[str], message: str) -> None:
    cert = pki.issue("metadata")
    values = {"cert": str(cert.cert), "key": str(cert.key), "missing": str(tmp_path / "nope.pem")}
    with pytest.raises(SystemExit) as done:
        _parse([a.format(**values) for a in argv])
    assert done.value.code == 2
    assert message in capsys.readouterr().err
