"""The replay's outputs: a summary table on the terminal, a JSON file and PNG plots.

Plots use matplotlib's non-interactive Agg backend, imported only when plots are written, so
the table alone needs no plotting library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvmesh.tools.replay.metrics import ReplayResult


def _pct(x: object) -> str:
    return f"{float(x) * 100:.1f}%"  # type: ignore[arg-type]


def _ms(x: object) -> str:
    v = float(x)  # type: ignore[arg-type]
    return f"{v / 1000:.2f} s" if v >= 1000 else f"{v:.0f} ms"


def _gbps(x: object) -> str:
    return "-" if x is None else f"{float(x):g}"  # type: ignore[arg-type]


def wide_console() -> Console:
    """A console that does not squeeze the summary table when output is not a terminal."""
    console = Console()
    return console if console.is_terminal else Console(width=210)


def summary_table(results: Sequence[ReplayResult], title: str = "trace replay") -> Table:
    table = Table(title=title)
    for col in ("policy", "mode", "pool", "pool GB/s", "requests", "local hit", "pool hit", "total hit", "bound",
                "of bound", "TTFT p50", "TTFT p99", "req/s", "prompt tok/s", "max/mean req", "in-flight spread"):
        table.add_column(col, justify="left" if col in ("policy", "mode") else "right")
    for res in results:
        s = res.summary()
        table.add_row(
            str(s["policy"]),
            str(s["mode"]),
            f"{int(res.settings.get('pool_blocks', 0) or 0):,}",  # type: ignore[call-overload]
            _gbps(res.settings.get("pool_gbps") if res.settings.get("pool_blocks") else None),
            str(s["requests"]),
            _pct(s["local_hit_rate"]),
            _pct(s["pool_hit_rate"]),
            _pct(s["total_hit_rate"]),
            _pct(s["infinite_cache_bound"]),
            _pct(s["fraction_of_bound"]),
            _ms(s["ttft_p50_ms"]),
            _ms(s["ttft_p99_ms"]),
            f"{float(s['throughput_req_s']):.2f}",
            f"{float(s['throughput_prompt_tok_s']):,.0f}",
            f"{float(s['max_over_mean_requests']):.3f}",
            f"{float(s['inflight_spread_mean']):.1f} (max {s['inflight_spread_max']})",
        )
    return table


def print_summary(results: Sequence[ReplayResult], console: Console | None = None, title: str = "trace replay") -> None:
    (console or wide_console()).print(summary_table(results, title))


def write_json(results: Sequence[ReplayResult], path: Path, extra: dict[str, object] | None = None) -> None:
    doc = {**(extra or {}), "results": [r.to_json() for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1))


def write_plots(results: Sequence[ReplayResult], out_dir: Path, window_s: float = 60.0) -> list[Path]:
    """hit_rate.png (block hit rate per time window, per policy) and ttft_cdf.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    labels = _labels(results)

    fig, ax = plt.subplots(figsize=(9, 5))
    for res, label in zip(results, labels, strict=True):
        xs, local, total, _ = res.hit_rate_over_time(window_s)
        minutes = [x / 60 for x in xs]
        (line,) = ax.plot(minutes, [t * 100 for t in total], label=f"{label} total")
        if any(abs(a - b) > 1e-9 for a, b in zip(local, total, strict=True)):
            ax.plot(minutes, [v * 100 for v in local], linestyle="--", color=line.get_color(),
                    label=f"{label} engine-local")
    if results:
        xs, _, _, ideal = results[0].hit_rate_over_time(window_s)
        ax.plot([x / 60 for x in xs], [v * 100 for v in ideal], color="black", linestyle=":",
                label=f"one infinite cache ({results[0].bound * 100:.1f}% overall)")
    ax.set_xlabel("trace time (min)")
    ax.set_ylabel(f"prompt blocks served from cache (%, {window_s:g} s windows)")
    ax.set_title("Block hit rate over time")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    path = out_dir / "hit_rate.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(9, 5))
    for res, label in zip(results, labels, strict=True):
        ttft = np.sort(np.asarray([r.ttft_ms for r in res.records], dtype=float)) / 1000.0
        if ttft.size:
            ax.plot(ttft, np.arange(1, ttft.size + 1) / ttft.size, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("simulated time to first token (s, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    path = out_dir / "ttft_cdf.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    return written


def _labels(results: Sequence[ReplayResult]) -> list[str]:
    out = []
    for r in results:
        pool = r.settings.get("pool_blocks", 0)
        rate = r.settings.get("pool_gbps") if pool else None
        out.append(f"{r.policy}" + (f" + pool {pool}" if pool else "") + (f" @ {rate:g} GB/s" if rate else "")
                   + (" (live)" if r.mode == "live" else ""))
    return out
