"""`--storage` and its older name `--engine` (public: scripts and manifests still use it)."""

from __future__ import annotations

import argparse

import pytest

from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.services.cachenode.settings import CacheNodeSettings


def parse(argv: list[str]) -> CacheNodeSettings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, CacheNodeSettings)
    return settings_from_args(CacheNodeSettings, parser.parse_args(argv))


def test_storage_flag_and_its_older_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMESH_STORAGE", raising=False)
    monkeypatch.delenv("KVMESH_ENGINE", raising=False)
    assert parse(["--storage", "disk:///tmp/a"]).storage == "disk:///tmp/a"
    assert parse(["--engine", "disk:///tmp/b"]).storage == "disk:///tmp/b"
    assert parse(["--storage", "disk:///tmp/a", "--engine", "disk:///tmp/b"]).storage == "disk:///tmp/a"
    assert parse([]).storage == CacheNodeSettings.model_fields["storage"].default


def test_environment_variables_of_both_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMESH_STORAGE", raising=False)
    monkeypatch.setenv("KVMESH_ENGINE", "memory://?capacity=8MiB")
    assert parse([]).storage == "memory://?capacity=8MiB"
    monkeypatch.setenv("KVMESH_STORAGE", "memory://?capacity=16MiB")
    assert parse([]).storage == "memory://?capacity=16MiB"
