"""`kvmesh agent` settings: which engine to watch, how to announce it, how often to look."""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator

from kvmesh.settings import MemberSettings


class AgentSettings(MemberSettings):
    """Flags of the vLLM sidecar (every one also `KVMESH_<FLAG>`)."""

    engine_url: str = Field("http://127.0.0.1:8000", description="the engine's OpenAI server (http://HOST:PORT)")
    model: str = Field("", description="model the engine serves (default: the first of its /v1/models)")
    kv_events: str = Field("", description="the engine's own KV-event publisher (member label `kv-events`)")
    kv_events_replay: str = Field(
        "", description="the engine's KV-event replay endpoint (member label `kv-events-replay`)"
    )
    engine_address: str = Field(
        "", description="HOST:PORT routed requests go to (default: the --engine-url host and port)"
    )
    poll_interval_seconds: float = Field(1.0, gt=0, le=600, description="how often /health and /metrics are read")
    http_timeout_seconds: float = Field(2.0, gt=0, le=600, description="timeout of each request to the engine")
    unhealthy_after: int = Field(
        2, ge=1, le=1000, description="failed /health checks in a row after which the member leaves the mesh"
    )

    @field_validator("engine_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None:
            raise ValueError(f"expected http://HOST:PORT, got {value!r}")
        return value.rstrip("/")

    @field_validator("kv_events", "kv_events_replay")
    @classmethod
    def _zmq_endpoint(cls, value: str) -> str:
        if value and not value.startswith(("tcp://", "ipc://")):
            raise ValueError(f"expected tcp://HOST:PORT or ipc://PATH, got {value!r}")
        return value

    @property
    def advertised_engine(self) -> str:
        if self.engine_address:
            return self.engine_address
        parts = urlsplit(self.engine_url)
        return f"{parts.hostname}:{parts.port}"
