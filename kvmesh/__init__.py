"""kvmesh: a distributed KV-cache mesh for LLM inference.

Three layers, imports only going down (`docs/architecture.md`, enforced by `make lint`):
the foundation is this package's own modules (runtime, settings, telemetry, block keys,
wire formats, membership and cache clients); `kvmesh.services` holds the services;
`kvmesh.tools` the `kvmesh` command, `kvmesh up`, trace replay and the test mesh.
"""

__version__ = "0.1.0"
