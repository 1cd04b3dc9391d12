"""Workloads for the engine simulator and the replay benchmark: Mooncake traces and a generator."""

from kvmesh.tools.workload.trace import TraceRequest, infinite_cache_bound, load_trace

__all__ = ["TraceRequest", "infinite_cache_bound", "load_trace"]
