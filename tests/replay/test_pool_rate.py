"""The simulator's pool transfer rate: measured (a rate file from the benchmark) or a flag, the
break-even arithmetic, and that the rate changes simulated TTFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmesh.services.enginesim.timing import TimingModel
from kvmesh.tools.cli.main import main
from kvmesh.tools.replay.core_router import CoreRouter
from kvmesh.tools.replay.simulate import ReplayConfig, replay_in_process
from kvmesh.tools.replay.transfer import (
    ENV_FILE,
    MEASURED_LOOPBACK_GBPS,
    break_even_report,
    load_pool_rate,
    resolve_pool_rate,
    save_pool_rate,
)
from kvmesh.tools.workload.generator import WorkloadSpec, generate_workload


def test_break_even_is_where_fetching_a_token_costs_its_recompute() -> None:
    m = TimingModel()
    even = m.break_even_gbps()
    # Llama-3-8B on an A100: 128 KiB per token / (16 GFLOP per token at 156 TFLOP/s) ≈ 1.28 GB/s.
    assert even == pytest.approx(131072 * 156e12 / (2 * 8e9 + 4 * 32 * 4096) / 1e9, rel=1e-9)
    assert 1.2 < even < 1.35
    at_even = TimingModel(pool_gbps=even)
    assert at_even.pool_fetch_ms(512) == pytest.approx(512 * at_even.prefill_ms_per_token(0))
    # A GPU three times as fast needs a pool three times as fast; deeper positions need less.
    assert TimingModel(peak_tflops=3 * 312).break_even_gbps() == pytest.approx(3 * even)
    assert m.break_even_gbps(position=32_000) < even
    # No KV to fetch: any rate wins.
    assert TimingModel(kv_bytes_per_token=0).break_even_gbps() == 0


def test_report_says_which_side_of_the_break_even_the_measured_rate_is() -> None:
    m = TimingModel()
    slow = break_even_report(m, resolve_pool_rate(0.64, None), 12.5)
    assert "above 1.28 GB/s" in slow and "0.64 GB/s" in slow and "0.50x break-even: recomputing beats fetching" in slow
    assert "12.5 GB/s (9.8x)" in slow
    fast = break_even_report(m, resolve_pool_rate(3.2, None), 12.5)
    assert "fetching beats recomputing" in fast.splitlines()[1].split(":")[-1]


def test_rate_file_round_trip_default_and_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rate.json"
    monkeypatch.setenv(ENV_FILE, str(path))
    missing = load_pool_rate()
    assert missing.gbps == MEASURED_LOOPBACK_GBPS and f"no {path}" in missing.source
    save_pool_rate(path, 2.345678, "test bench")
    rate = load_pool_rate()
    assert rate.gbps == pytest.approx(2.3457) and "test bench" in rate.source and str(path) in rate.source
    assert resolve_pool_rate(7.0, path).gbps == 7.0  # the flag wins over the file
    path.write_text(json.dumps({"pool_gbps": -1}))
    with pytest.raises(ValueError, match="positive"):
        load_pool_rate(path)
    path.write_text("not json")
    with pytest.raises(ValueError, match="not a pool-rate file"):
        load_pool_rate(path)
    with pytest.raises(ValueError, match="positive"):
        resolve_pool_rate(0.0, None)


def _ttft_p50(pool_gbps: float) -> float:
    # Random routing over 8 small engines: many prompt blocks come from the pool.
    requests = generate_workload(WorkloadSpec(conversations=10, seed=3))
    config = ReplayConfig(engines=8, capacity_blocks=64, pool_blocks=4000, timing=TimingModel(pool_gbps=pool_gbps))
    result = replay_in_process(requests, CoreRouter("random"), "random", config)
    assert float(result.summary()["pool_hit_rate"]) > 0  # the pool is used, so its rate matters
    return float(result.summary()["ttft_p50_ms"])


def test_a_slower_pool_makes_simulated_ttft_longer() -> None:
    assert _ttft_p50(0.3) > _ttft_p50(1.3) > _ttft_p50(12.5)


def test_bench_trace_takes_the_rate_from_the_flag_or_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    common = ["bench", "trace", "builtin", "--conversations", "10", "--engines", "8", "--capacity-blocks", "64",
              "--policy", "random", "--pool-blocks", "4000", "--quiet", "--out", str(tmp_path / "out")]
    rate_file = tmp_path / "rate.json"
    save_pool_rate(rate_file, 0.25, "a slow test pool")
    monkeypatch.setenv(ENV_FILE, str(rate_file))
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "pool transfer rate: 0.25 GB/s (a slow test pool" in printed and "break-even" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    # The measured rate and a production NIC's, side by side.
    assert [r["settings"]["pool_gbps"] for r in results] == [0.25, 12.5]
    slow, nic = (r["summary"]["ttft_p50_ms"] for r in results)
    assert slow > nic
    assert main([*common, "--pool-gbps", "40", "--nic-gbps", "100"]) == 0
    printed = capsys.readouterr().out
    assert "pool transfer rate: 40.00 GB/s (--pool-gbps)" in printed
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert [r["settings"]["pool_gbps"] for r in results] == [40, 100]
    assert results[0]["summary"]["ttft_p50_ms"] < slow
    rate_file.write_text("{}")
    with pytest.raises(SystemExit, match="not a pool-rate file"):
        main(common)
