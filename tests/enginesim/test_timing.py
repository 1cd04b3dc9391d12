"""The step-time model: orders of magnitude of an 8B model on an A100, and its monotonicity."""

from __future__ import annotations

import pytest

from kvmesh.services.enginesim.timing import TimingModel, attention_pairs


def test_empty_step_costs_nothing() -> None:
    assert TimingModel().step_ms() == 0.0


def test_single_decode_step_is_weight_bandwidth_bound() -> None:
    m = TimingModel()
    # 16 GB of weights at 2039 GB/s x 0.8 is ~9.8 ms, plus 4 ms overhead.
    assert m.step_ms(decode_seqs=1, decode_context_tokens=1000) == pytest.approx(13.9, abs=0.3)


def test_prefill_rate_is_about_ten_thousand_tokens_per_second() -> None:
    m = TimingModel()
    tokens = 8192
    ms = m.step_ms(prefill_tokens=tokens, prefill_attention_pairs=attention_pairs(0, tokens))
    rate = tokens / (ms / 1000.0)
    assert 7_000 < rate < 12_000


def test_prefill_grows_with_tokens_and_context() -> None:
    m = TimingModel()
    short = m.step_ms(prefill_tokens=512, prefill_attention_pairs=attention_pairs(0, 512))
    long = m.step_ms(prefill_tokens=4096, prefill_attention_pairs=attention_pairs(0, 4096))
    late = m.step_ms(prefill_tokens=4096, prefill_attention_pairs=attention_pairs(20_000, 24_096))
    assert short < long < late


def test_decode_batch_is_nearly_free_until_kv_reads_dominate() -> None:
    m = TimingModel()
    one = m.step_ms(decode_seqs=1, decode_context_tokens=2000)
    many = m.step_ms(decode_seqs=32, decode_context_tokens=32 * 2000)
    assert many < 32 * one / 4  # batching amortises the weight reads
    assert many > one  # but reading 64k tokens of KV is not free


def test_cache_hit_is_cheaper_than_recompute() -> None:
    m = TimingModel()
    block = 512
    recompute = m.step_ms(prefill_tokens=block, prefill_attention_pairs=attention_pairs(0, block)) - m.step_overhead_ms
    fetch = m.pool_fetch_ms(block)
    assert fetch == pytest.approx(512 * 131072 / 12.5e6)
    assert fetch < recompute / 5


def test_attention_pairs_counts_causal_pairs() -> None:
    assert attention_pairs(0, 1) == 1
    assert attention_pairs(0, 3) == 6  # 1 + 2 + 3
    assert attention_pairs(2, 3) == 3
    assert attention_pairs(5, 5) == 0


@pytest.mark.parametrize("field", ["mfu", "hbm_gbps", "pool_gbps", "peak_tflops"])
def test_rejects_non_positive_parameters(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TimingModel(**{field: 0})
