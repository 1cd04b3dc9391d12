"""`kvmesh bench trace` in process: the table, the JSON, the plots, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvmesh.tools.cli.main import main
from kvmesh.tools.workload.trace import TraceRequest, write_trace


def test_policies_and_pool_sizes_each_run_on_fresh_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["bench", "trace", "builtin", "--conversations", "30", "--engines", "2", "--capacity-blocks", "40",
               "--policy", "random,prefix", "--pool-blocks", "0,200", "--out", str(out), "--quiet"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "infinite-cache bound" in printed and "total hit" in printed
    summary = json.loads(printed.split("KVMESH_BENCH_SUMMARY ", 1)[1])
    # Each pool size > 0 runs twice: at the measured pool rate and at a production NIC's.
    assert [(s["policy"], s["pool_hit_rate"] > 0) for s in summary] == [
        ("random", False), ("random", True), ("random", True), ("prefix", False), ("prefix", True), ("prefix", True)]
    random_alone, _, _, prefix_alone, _, prefix_pool_at_nic = summary
    assert prefix_alone["local_hit_rate"] > random_alone["local_hit_rate"]  # routing pays
    # A pool at a production NIC's rate pays too (at this machine's slow measured rate, loads
    # from the pool stretch requests and change routing, so it may only break even).
    assert prefix_pool_at_nic["total_hit_rate"] > prefix_alone["total_hit_rate"]
    assert all(s["total_hit_rate"] <= s["infinite_cache_bound"] + 1e-9 for s in summary)
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["results"]) == 6 and len(doc["results"][0]["requests"]) == summary[0]["requests"]
    for name in ("hit_rate.png", "ttft_cdf.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_trace_file_and_limit(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "t.jsonl"
    write_trace(path, [TraceRequest(i * 100.0, 1500, 20, (0, 1, 2 + i)) for i in range(10)])
    assert main(["bench", "trace", str(path), "--limit", "4", "--engines", "2", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out.split("KVMESH_BENCH_SUMMARY ", 1)[1])
    assert summary[0]["requests"] == 4 and summary[0]["prompt_blocks"] == 12


def test_bad_input_is_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "trace", str(tmp_path / "missing.jsonl"), "--quiet"]) == 2
    assert main(["bench", "trace", "builtin", "--policy", "nosuch", "--quiet"]) == 1
    assert "unknown policy" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="not a router setting"):
        main(["bench", "trace", "builtin", "--router-setting", "bogus=1", "--quiet"])
    assert main(["bench"]) == 2
