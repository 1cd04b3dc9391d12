"""How long one continuous-batching step of a simulated inference engine takes.

A roofline model: a step costs a fixed scheduler/sampling overhead plus the larger of its
compute time (dense matmuls over every token in the step, plus attention over each prefill
token's context) and its memory time (reading the weights once, plus the KV cache of every
decoding sequence). Prefill is compute-bound and decode memory-bound, which is what makes
cache hits worth having: a block found in the cache skips its share of compute.

Defaults describe Llama-3-8B in bf16 on one A100-SXM4-80GB:
- 8.0e9 parameters x 2 bytes = 16 GB of weights read per step;
- 312 TFLOPS bf16 peak at 50% model FLOPs utilisation (vLLM prefill reaches ~45-60%) ⇒
  2 x 8e9 FLOPs/token / 156e12 ≈ 0.10 ms per prefill token (~10k tokens/s);
- 2,039 GB/s HBM at 80% efficiency ⇒ ≈ 9.8 ms per decode step for the weights alone;
- KV cache 32 layers x 8 KV heads x 128 dims x 2 (K,V) x 2 bytes = 128 KiB per token, so a
  512-token block is 64 MiB and 1,000 blocks (~62.5 GiB) fill what is left of 80 GB;
- 4 ms per step for scheduling, sampling and Python overhead (vLLM's CPU share per step);
- chunked prefill with 8,192 tokens per step, at most 256 running sequences (vLLM defaults
  on A100 for this model size);
- cache-pool fetches at 12.5 GB/s (a 100 Gb/s NIC): one 512-token block in ~5.4 ms instead of
  ~55 ms of prefill compute. `kvmesh bench trace` and `kvmesh up` set this from a measured rate
  (see kvmesh/tools/replay/transfer.py), since a rate the data path does not deliver flatters
  the pool.

The break-even rate is where fetching a token's KV cache takes as long as recomputing it:
kv_bytes_per_token / prefill time per token. For the defaults, 128 KiB / 0.103 ms ≈ 1.28 GB/s
at the start of a prompt (deeper positions cost more attention to recompute, so less).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TimingModel:
    """Parameters of the step-time model; every field is a flag of `kvmesh enginesim`."""

    params_billion: float = 8.0
    bytes_per_param: float = 2.0
    layers: int = 32
    hidden_size: int = 4096
    kv_bytes_per_token: int = 131_072
    peak_tflops: float = 312.0
    mfu: float = 0.5
    hbm_gbps: float = 2039.0
    hbm_efficiency: float = 0.8
    step_overhead_ms: float = 4.0
    max_batched_tokens: int = 8192
    max_running: int = 256
    pool_gbps: float = 12.5

    def __post_init__(self) -> None:
        for name in ("params_billion", "bytes_per_param", "peak_tflops", "mfu", "hbm_gbps",
                     "hbm_efficiency", "pool_gbps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.step_overhead_ms < 0:
            raise ValueError("step_overhead_ms must not be negative")
        if self.max_batched_tokens < 1 or self.max_running < 1 or self.layers < 1 or self.hidden_size < 1:
            raise ValueError("max_batched_tokens, max_running, layers and hidden_size must be positive")
        if self.kv_bytes_per_token < 0:
            raise ValueError("kv_bytes_per_token must not be negative")

    @property
    def flops_per_ms(self) -> float:
        return self.peak_tflops * 1e12 * self.mfu / 1e3

    @property
    def bytes_per_ms(self) -> float:
        return self.hbm_gbps * 1e9 * self.hbm_efficiency / 1e3

    @property
    def weight_bytes(self) -> float:
        return self.params_billion * 1e9 * self.bytes_per_param

    def step_ms(
        self,
        prefill_tokens: int = 0,
        prefill_attention_pairs: float = 0.0,
        decode_seqs: int = 0,
        decode_context_tokens: float = 0.0,
    ) -> float:
        """One step: `prefill_tokens` new prompt tokens (whose attention spans
        `prefill_attention_pairs` queryxkey pairs in total) and `decode_seqs` sequences producing
        one token each over `decode_context_tokens` cached tokens in total. An empty step costs 0."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        tokens = max(prefill_tokens, 0) + max(decode_seqs, 0)
        dense_flops = 2.0 * self.params_billion * 1e9 * tokens
        # QKᵀ and AV: 2 matmuls x 2 FLOPs per multiply-add x hidden x layers per (query, key) pair.
        attention_flops = 4.0 * self.layers * self.hidden_size * (prefill_attention_pairs + decode_context_tokens)
        compute_ms = (dense_flops + attention_flops) / self.flops_per_ms
        memory_ms = (self.weight_bytes + self.kv_bytes_per_token * decode_context_tokens) / self.bytes_per_ms
        return self.step_overhead_ms + max(compute_ms, memory_ms)

    def prefill_ms_per_token(self, position: int = 0) -> float:
        """Compute time of one prompt token at `position` (dense matmuls + attention to its context)."""
        flops = 2.0 * self.params_billion * 1e9 + 4.0 * self.layers * self.hidden_size * (max(position, 0) + 1)
        return flops / self.flops_per_ms

    def break_even_gbps(self, position: int = 0) -> float:
        """The pool rate (GB/s) above which fetching a token's KV beats recomputing it at `position`."""
        return self.kv_bytes_per_token / self.prefill_ms_per_token(position) / 1e6

    def pool_fetch_ms(self, tokens: int) -> float:
        """Time to copy `tokens` tokens of KV cache from the cache pool into GPU memory."""
        return self.kv_bytes_per_token * max(tokens, 0) / (self.pool_gbps * 1e9 / 1e3)


def attention_pairs(start: int, end: int) -> float:
    """Queryxkey pairs when prompt positions [start, end) attend causally to everything before them."""
    if end <= start:
        return 0.0
    # Σ_{p=start}^{end-1} (p + 1)
    return (end * (end + 1) - start * (start + 1)) / 2.0
