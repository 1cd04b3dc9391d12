"""`kvmesh router` settings: every routing knob is a validated flag and a `KVMESH_*` variable."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from kvmesh.blocks import DEFAULT_BLOCK_SIZE, DEFAULT_TEXT_BLOCK_BYTES
from kvmesh.services.router.media import DEFAULT_MEDIUM_WEIGHTS, parse_weights
from kvmesh.settings import MemberSettings

DEFAULT_ROUTER_ADDRESS = "127.0.0.1:7600"  # what `kvmesh route --router` dials by default
POLICY_NAMES = ("random", "round-robin", "least-load", "prefix", "cache-aware", "kv-aware")


class RouterSettings(MemberSettings):
    """Flags of the prefix-aware router."""

    listen: str = Field(default=DEFAULT_ROUTER_ADDRESS, description="HOST:PORT to serve gRPC on")
    policy: str = Field(default="prefix", description=f"routing policy: {', '.join(POLICY_NAMES)}")
    block_size: int = Field(
        default=DEFAULT_BLOCK_SIZE, ge=1, le=65536, description="tokens per block when hashing token ids"
    )
    text_block_bytes: int = Field(
        DEFAULT_TEXT_BLOCK_BYTES, ge=1, le=1 << 20, description="UTF-8 bytes per block when hashing text prompts"
    )
    hash_namespace: str = Field(default="", description="namespace mixed into block hashes (must match the engines')")
    max_tree_blocks: int = Field(
        1_000_000, ge=16, le=1_000_000_000, description="blocks the prefix tree keeps before evicting leaves"
    )
    max_prompt_blocks: int = Field(
        65_536, ge=1, le=10_000_000, description="longest prompt accepted, in blocks (longer: INVALID_ARGUMENT)"
    )
    approx_ttl_seconds: float = Field(
        120.0, gt=0, le=7 * 86400, description="how long a block learnt approximately (from a route) is trusted"
    )
    sweep_interval_seconds: float = Field(
        5.0, gt=0, le=3600, description="how often expired approximate blocks and stale in-flight requests are swept"
    )
    inflight_timeout_seconds: float = Field(
        600.0, gt=0, le=7 * 86400, description="a routed request never released stops counting as load after this"
    )
    imbalance_abs: int = Field(
        8, ge=0, le=1_000_000, description="prefix: when max-min load exceeds this, only least-loaded pods compete"
    )
    share_weight: float = Field(
        4.0, ge=0.0, le=1_000.0,
        description="prefix: prompt share one pod's excess of recent routes over the mean costs it "
        "(4.0: a tenth of the mean share above chance outweighs 0.4 of the prompt matched; 0: off)",
    )
    share_window: int = Field(
        256, ge=1, le=10_000_000, description="prefix: routes over which a pod's share of recent routes fades"
    )
    cache_threshold: float = Field(
        0.5, ge=0.0, le=1.0, description="cache-aware: match ratio above which the best-matching pod wins"
    )
    balance_abs: int = Field(
        32, ge=0, le=1_000_000, description="cache-aware: load gap (max-min) that counts as imbalanced"
    )
    balance_rel: float = Field(
        1.5, ge=1.0, le=1_000_000.0, description="cache-aware: load ratio (max/min) that counts as imbalanced"
    )
    overlap_weight: float = Field(
        1.0, ge=0.0, le=1_000_000.0, description="kv-aware: cost of one block still to prefill, in requests of load"
    )
    temperature: float = Field(
        0.0, ge=0.0, le=1_000_000.0, description="kv-aware: softmax temperature over -cost (0: lowest cost wins)"
    )
    random_seed: int | None = Field(
        default=None, ge=0, description="seed of the policies' random choices (default: random)"
    )
    max_request_id_bytes: int = Field(
        256, ge=8, le=65536, description="longest request_id a client may send (longer: INVALID_ARGUMENT)"
    )
    max_model_bytes: int = Field(256, ge=8, le=65536, description="longest model name a client may send")
    max_inflight_requests: int = Field(
        100_000, ge=16, le=100_000_000, description="routed, unreleased requests remembered; the oldest is forgotten"
    )
    rejoin_grace_seconds: float = Field(
        30.0, ge=0, le=86400,
        description="an engine that left keeps its prefix tree this long in case it rejoins (0: dropped at once)",
    )
    event_slice_blocks: int = Field(
        4096,
        ge=16,
        le=1 << 20,
        description="KV events are applied in slices of about this many blocks, one per event-loop turn",
    )
    ext_proc_listen: str | None = Field(
        default=None, description="HOST:PORT to serve Envoy's ext_proc endpoint picker on (default: off)"
    )
    ext_proc_max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, le=256 * 1024 * 1024,
        description="ext_proc: largest request body read (larger: HTTP 413)",
    )
    ext_proc_max_streams: int = Field(
        4096, ge=1, le=1_000_000, description="ext_proc: concurrent streams, one per HTTP request in flight"
    )
    ext_proc_shed_inflight: int = Field(
        0, ge=0, le=1_000_000, description="ext_proc: HTTP 429 when every pod has this many in flight (0: never)"
    )
    register_self: bool = Field(
        default=True, description="register the router itself with the metadata service (ROLE_ROUTER)"
    )

    # ---- vLLM KV events over ZMQ (docs/router.md, "KV events") --------------------------------
    kv_events_listen: str = Field(
        "", description="central mode: bind one ZMQ SUB here (tcp://127.0.0.1:PORT) that every vLLM connects to "
                  "(default: off; plain ZMQ without TLS: keep it on loopback, docs/security.md)"
    )
    kv_events_connect: bool = Field(
        True, description="per-pod mode: subscribe to each engine member's `kv-events` label endpoint"
    )
    kv_events_queue: int = Field(
        1024, ge=1, le=1_000_000, description="KV-event batches queued before new ones are dropped (then replayed)"
    )
    kv_events_max_message_bytes: int = Field(
        4 << 20, ge=1024, le=1 << 30, description="largest ZMQ KV-event message accepted (larger: dropped by ZMQ)"
    )
    kv_events_max_blocks_per_pod: int = Field(
        1_000_000, ge=16, le=100_000_000, description="engine block hashes remembered per pod (oldest dropped beyond)"
    )
    kv_events_slice_blocks: int = Field(
        128, ge=1, le=1 << 20, description="KV-event blocks hashed and applied per event-loop turn"
    )
    kv_events_turn_ms: float = Field(
        0.25, gt=0, le=1000, description="KV-event receiving and applying done per event-loop turn before routes run"
    )
    kv_events_decode_inline_bytes: int = Field(
        64 * 1024, ge=0, le=1 << 30, description="KV-event payloads larger than this are decoded in a worker thread"
    )
    kv_events_replay_timeout_seconds: float = Field(
        2.0, gt=0, le=600, description="wait for each reply of an engine's replay endpoint"
    )
    kv_events_replay_max_batches: int = Field(
        100_000, ge=1, le=10_000_000, description="batches read from one replay before it stops"
    )
    kv_medium_weights: str = Field(
        DEFAULT_MEDIUM_WEIGHTS,
        description="MEDIUM=WEIGHT,...: what a matched block held only in that medium is worth in scoring "
        "(unlisted or absent medium: as GPU)",
    )
    warm_check_interval_seconds: float = Field(
        0.5, gt=0, le=60, description="how often the `kvmesh.v1.Router.warm` health status is brought up to date"
    )
    tokenizer: str = Field(
        "", description="MODEL=PATH[,MODEL=PATH]: local tokenizer.json used to tokenize text requests for MODEL"
    )
    tokenize_inline_chars: int = Field(
        2048, ge=0, le=1 << 30, description="text prompts longer than this are tokenized in a worker thread"
    )

    @field_validator("kv_medium_weights")
    @classmethod
    def _medium_weights(cls, value: str) -> str:
        parse_weights(value)
        return value

    @field_validator("tokenizer")
    @classmethod
    def _tokenizer_pairs(cls, value: str) -> str:
        for item in filter(None, (p.strip() for p in value.split(","))):
            model, sep, path = item.partition("=")
            if not sep or not model or not path:
                raise ValueError(f"{item!r} is not MODEL=PATH")
            file = Path(path.strip())
            if not (file / "tokenizer.json" if file.is_dir() else file).is_file():
                raise ValueError(f"{path.strip()!r}: no tokenizer.json there")
        return value

    @property
    def tokenizer_paths(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for item in filter(None, (p.strip() for p in self.tokenizer.split(","))):
            model, _, path = item.partition("=")
            out[model.strip()] = path.strip()
        return out
    @field_validator("ext_proc_listen")
    @classmethod
    def _ext_proc_address(cls, value: str | None) -> str | None:
        return cls._check_address(value) if value else None

    @field_validator("policy")
    @classmethod
    def _known_policy(cls, value: str) -> str:
        if value not in POLICY_NAMES:
            raise ValueError(f"unknown policy {value!r} (known: {', '.join(POLICY_NAMES)})")
        return value
