"""URI parsing, sizes, the lazy registry, settings from flags and env, and backoff."""

from __future__ import annotations

import argparse

import pytest

from kvmesh.backoff import Backoff
from kvmesh.flags import add_settings_arguments, settings_from_args
from kvmesh.registry import LazyRegistry
from kvmesh.settings import MemberSettings, split_addresses
from kvmesh.units import format_size, parse_size
from kvmesh.uri import UriError, parse_uri


def test_parse_uri_forms() -> None:
    u = parse_uri("memory://?capacity=2GiB&policy=lru")
    assert u.scheme == "memory" and u.hosts == () and u.size_param("capacity", 0) == 2 * 1024**3
    u = parse_uri("redis://:s3cret@127.0.0.1:6380/2?timeout=1")
    assert (u.host, u.port, u.path, u.password) == ("127.0.0.1", 6380, "/2", "s3cret")
    assert "s3cret" not in u.redacted()
    u = parse_uri("redis+cluster://a:1,b:2,c:3")
    assert [h for h, _ in u.hosts] == ["a", "b", "c"]
    u = parse_uri("disk:///var/lib/kvmesh?capacity=50GiB")
    assert u.path == "/var/lib/kvmesh" and u.host == ""
    u = parse_uri("etcd://127.0.0.1:2379?prefix=/kvmesh")
    assert u.param("prefix") == "/kvmesh"


@pytest.mark.parametrize("bad", ["", "memory", "://x", "redis://h:notaport", "a b://x"])
def test_parse_uri_rejects(bad: str) -> None:
    with pytest.raises(UriError):
        parse_uri(bad)


def test_uri_params_validate() -> None:
    u = parse_uri("memory://?capacity=lots&n=x&b=maybe")
    with pytest.raises(UriError):
        u.size_param("capacity", 0)
    with pytest.raises(UriError):
        u.int_param("n", 0)
    with pytest.raises(UriError):
        u.bool_param("b", False)


def test_sizes() -> None:
    assert parse_size("64KiB") == 65536
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size(10) == 10
    assert format_size(3 * 1024**2) == "3.0 MiB"
    for bad in ("", "x", "5 parsecs", -1):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_lazy_registry_imports_on_resolve() -> None:
    reg: LazyRegistry[object] = LazyRegistry("thing")
    reg.register("od", "collections", "OrderedDict")
    reg.register("missing", "kvmesh_no_such_module", "X")
    import collections

    assert reg.resolve("od") is collections.OrderedDict
    with pytest.raises(UriError, match="unknown thing scheme"):
        reg.resolve("nope")
    with pytest.raises(UriError, match="optional dependency"):
        reg.resolve("missing")
    with pytest.raises(ValueError):
        reg.register("od", "x", "y")


def test_settings_flags_beat_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMESH_TTL_SECONDS", "7")
    monkeypatch.setenv("KVMESH_LISTEN", "127.0.0.1:9999")
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, MemberSettings)
    s = settings_from_args(MemberSettings, parser.parse_args(["--listen", "127.0.0.1:1234"]))
    assert s.listen == "127.0.0.1:1234" and s.ttl_seconds == 7
    s = settings_from_args(MemberSettings, parser.parse_args(["--max-message-bytes", "8MiB"]))
    assert s.max_message_bytes == 8 * 1024**2


def test_bad_settings_exit_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, MemberSettings)
    with pytest.raises(SystemExit) as exc:
        settings_from_args(MemberSettings, parser.parse_args(["--listen", "nohost"]))
    assert exc.value.code == 2
    assert "--listen" in capsys.readouterr().err
    monkeypatch.setenv("KVMESH_TTL_SECONDS", "0")
    with pytest.raises(SystemExit):
        settings_from_args(MemberSettings, parser.parse_args([]))


def test_split_addresses() -> None:
    assert split_addresses("a:1, b:2") == ["a:1", "b:2"]
    for bad in ("", "a", "a:0", "a:x", ":1"):
        with pytest.raises(ValueError):
            split_addresses(bad)


async def test_backoff_respects_deadline() -> None:
    b = Backoff(base_s=0.01, cap_s=0.02)
    seen = [a async for a in b.attempts(deadline_s=0.1)]
    assert 2 <= len(seen) <= 30
    assert all(0 <= b.delay(n) <= 0.02 for n in range(50))
