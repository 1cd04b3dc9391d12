"""kvmesh processes for tests and benchmarks: the same class `kvmesh up` uses.

Kept as an import path for existing callers; the class lives in `kvmesh.tools.processes`.
"""

from __future__ import annotations

from kvmesh.tools.processes import READY_PREFIX, KvmeshProcess, kvmesh_env

__all__ = ["READY_PREFIX", "KvmeshProcess", "kvmesh_env"]
