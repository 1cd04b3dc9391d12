"""kvmesh: a distributed KV-cache mesh for LLM inference.

The package holds what every service shares (runtime, config, telemetry, block keys,
membership clients) and the client library an inference engine embeds.
"""

__version__ = "0.1.0"
