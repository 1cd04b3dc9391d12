"""Parsing of engine and backend URIs (`memory://?capacity=2GiB`, `etcd://host:2379?prefix=/kvmesh`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote, urlsplit

from kvmesh.units import parse_size


class UriError(ValueError):
    """A URI that names no known scheme or carries bad parameters."""


@dataclass(frozen=True)
class Uri:
    """A parsed URI: scheme, optional credentials, host list, path and query parameters."""

    raw: str
    scheme: str
    hosts: tuple[tuple[str, int | None], ...] = ()
    path: str = ""
    username: str | None = None
    password: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.hosts[0][0] if self.hosts else ""

    @property
    def port(self) -> int | None:
        return self.hosts[0][1] if self.hosts else None

    def param(self, name: str, default: str | None = None) -> str | None:
        return self.params.get(name, default)

    def size_param(self, name: str, default: int) -> int:
        value = self.params.get(name)
        if value is None:
            return default
        try:
            return parse_size(value)
        except ValueError as exc:
            raise UriError(f"{self.redacted()}: bad {name}: {exc}") from exc

    def int_param(self, name: str, default: int) -> int:
        value = self.params.get(name)
        if value is None:
            return default
        try:
            return int(value)
        except ValueError as exc:
            raise UriError(f"{self.redacted()}: {name} must be an integer, got {value!r}") from exc

    def float_param(self, name: str, default: float) -> float:
        value = self.params.get(name)
        if value is None:
            return default
        try:
            return float(value)
        except ValueError as exc:
            raise UriError(f"{self.redacted()}: {name} must be a number, got {value!r}") from exc

    def bool_param(self, name: str, default: bool) -> bool:
        value = self.params.get(name)
        if value is None:
            return default
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise UriError(f"{self.redacted()}: {name} must be true or false, got {value!r}")

    def redacted(self) -> str:
        """The URI with any password hidden, for logs and error messages."""
        if self.password is None:
            return self.raw
        return self.raw.replace(f":{self.password}@", ":***@")


def parse_uri(text: str) -> Uri:
    """Parses `scheme://[user:pass@]host[:port][,host[:port]...][/path][?k=v&...]`."""
    if not isinstance(text, str) or "://" not in text:
        raise UriError(f"not a URI (expected scheme://...): {text!r}")
    scheme, rest = text.split("://", 1)
    if not scheme or not scheme.replace("+", "").replace("-", "").isalnum():
        raise UriError(f"bad URI scheme in {text!r}")
    # urlsplit cannot take a comma-separated host list, so split the authority by hand.
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    path_part, _, query = tail.partition("?")
    username = password = None
    if "@" in authority:
        creds, authority = authority.rsplit("@", 1)
        user, _, pw = creds.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if pw else None
    hosts: list[tuple[str, int | None]] = []
    for item in filter(None, authority.split(",")):
        probe = urlsplit(f"//{item}")
        try:
            port = probe.port
        except ValueError as exc:
            raise UriError(f"bad port in {text!r}") from exc
        hosts.append((probe.hostname or "", port))
    try:
        params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    except ValueError as exc:
        raise UriError(f"bad query string in {text!r}") from exc
    return Uri(
        raw=text,
        scheme=scheme.lower(),
        hosts=tuple(hosts),
        path=unquote(path_part),
        username=username,
        password=password,
        params=params,
    )
