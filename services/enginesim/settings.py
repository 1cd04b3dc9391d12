"""Settings of `kvmesh enginesim`: its memory, its speed model and how it reaches the mesh."""

from __future__ import annotations

from pydantic import Field, field_validator

from kvmesh.blocks import DEFAULT_TEXT_BLOCK_BYTES
from kvmesh.services.enginesim.timing import TimingModel
from kvmesh.settings import MemberSettings, split_addresses
from kvmesh.units import parse_size

_DEFAULT = TimingModel()


class EngineSimSettings(MemberSettings):
    """Flags of the engine simulator (defaults: Llama-3-8B on one A100-80GB, see timing.py)."""

    model: str = Field("llama-3-8b", description="model name registered with the mesh")
    capacity_blocks: int = Field(1000, ge=1, le=10_000_000, description="GPU prefix-cache size in blocks")
    block_tokens: int = Field(
        512, ge=1, le=65536, description="tokens per KV block (trace blocks: 512; token prompts are cut so)"
    )
    block_bytes: int = Field(
        4096, ge=1, le=256 * 1024 * 1024, description="real bytes moved to/from the cache pool per block"
    )
    namespace: str = Field("kvmesh", description="cache-pool namespace of the blocks")
    hash_namespace: str = Field(
        "", description="namespace mixed into token-prompt block ids (must match the router's --hash-namespace)"
    )
    http_listen: str | None = Field(
        None, description="HOST:PORT of the OpenAI HTTP face (default: off); advertised as label openai-address"
    )
    http_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024, description="HTTP face: largest request body (larger: 413)"
    )
    text_block_bytes: int = Field(
        DEFAULT_TEXT_BLOCK_BYTES, ge=1, le=1 << 20,
        description="HTTP face: UTF-8 bytes per block of a text prompt (must match the router's)",
    )
    pool: bool = Field(True, description="fetch missing prefix blocks from the cache pool and offload new ones")
    router: str | None = Field(
        None, description="router HOST:PORT to send KV events to (default: routers found in the membership)"
    )
    speedup: float = Field(1.0, gt=0, le=1_000_000, description="simulated time runs this many times faster")
    request_timeout_seconds: float = Field(600.0, gt=0, description="longest a Generate call may wait")
    params_billion: float = Field(_DEFAULT.params_billion, gt=0, description="model parameters (billions)")
    bytes_per_param: float = Field(_DEFAULT.bytes_per_param, gt=0, description="bytes per weight")
    layers: int = Field(_DEFAULT.layers, ge=1, description="transformer layers")
    hidden_size: int = Field(_DEFAULT.hidden_size, ge=1, description="model width")
    kv_bytes_per_token: int = Field(_DEFAULT.kv_bytes_per_token, ge=0, description="KV-cache bytes per token")
    peak_tflops: float = Field(_DEFAULT.peak_tflops, gt=0, description="GPU peak TFLOPS (bf16)")
    mfu: float = Field(_DEFAULT.mfu, gt=0, le=1, description="model FLOPs utilisation reached")
    hbm_gbps: float = Field(_DEFAULT.hbm_gbps, gt=0, description="GPU memory bandwidth GB/s")
    hbm_efficiency: float = Field(_DEFAULT.hbm_efficiency, gt=0, le=1, description="fraction of bandwidth reached")
    step_overhead_ms: float = Field(_DEFAULT.step_overhead_ms, ge=0, description="fixed cost of a batch step")
    max_batched_tokens: int = Field(_DEFAULT.max_batched_tokens, ge=1, description="token budget of one step")
    max_running: int = Field(_DEFAULT.max_running, ge=1, description="most sequences in one batch")
    pool_gbps: float = Field(_DEFAULT.pool_gbps, gt=0, description="cache-pool → GPU copy bandwidth GB/s")

    @field_validator("block_bytes", mode="before")
    @classmethod
    def _size(cls, value: object) -> object:
        return parse_size(value) if isinstance(value, str) else value

    @field_validator("http_listen")
    @classmethod
    def _http_address(cls, value: str | None) -> str | None:
        return cls._check_address(value) if value else None

    @field_validator("router")
    @classmethod
    def _check_router(cls, value: str | None) -> str | None:
        if value:
            split_addresses(value)
        return value or None

    def timing(self) -> TimingModel:
        return TimingModel(**{name: getattr(self, name) for name in TimingModel.__dataclass_fields__})
