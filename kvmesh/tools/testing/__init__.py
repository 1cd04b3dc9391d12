"""Harness shared by tests and benchmarks: real servers on loopback ports and kvmesh processes."""
