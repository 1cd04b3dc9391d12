"""A lazy registry from a URI scheme to a class, imported only when chosen.

Cache-node storages and metadata stores are both selected this way, so a node without CUDA
or RDMA never imports those libraries, and no `if/elif` over backend names exists.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from typing import Generic, TypeVar

from kvmesh.uri import UriError

T = TypeVar("T")


class LazyRegistry(Generic[T]):
    """Maps a scheme to `module:Class`; `resolve(scheme)` imports the module on first use."""

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._entries: dict[str, tuple[str, str]] = {}
        self._loaded: dict[str, type[T]] = {}

    def register(self, scheme: str, module_path: str, class_name: str) -> None:
        if scheme in self._entries:
            raise ValueError(f"{self._kind} scheme {scheme!r} registered twice")
        self._entries[scheme] = (module_path, class_name)

    def schemes(self) -> Iterable[str]:
        return sorted(self._entries)

    def resolve(self, scheme: str) -> type[T]:
        if scheme in self._loaded:
            return self._loaded[scheme]
        try:
            module_path, class_name = self._entries[scheme]
        except KeyError:
            known = ", ".join(f"{s}://" for s in self.schemes())
            raise UriError(f"unknown {self._kind} scheme {scheme!r}:// (known: {known})") from None
        try:
            module = importlib.import_module(module_path)
        except ImportError as exc:
            raise UriError(
                f"{self._kind} {scheme}:// needs an optional dependency that is not installed: {exc}"
            ) from exc
        cls: type[T] = getattr(module, class_name)
        self._loaded[scheme] = cls
        return cls
