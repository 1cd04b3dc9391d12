"""The cache pool's transfer rate the simulator uses: measured, not assumed.

A pool only pays when fetching a block beats recomputing it, so the replay must move blocks
at the rate kvmesh really delivers. Benchmarks (`python -m bench.fastpath --write-rate`)
write what they measured to a small JSON file; `kvmesh bench trace` and `kvmesh up` read it
(`--pool-rate-file`, default below), or take `--pool-gbps` as given. Without a file they use
`MEASURED_LOOPBACK_GBPS`, a figure measured on the development machine, and say so.

File format (one object): {"pool_gbps": 0.9, "source": "what was measured", "measured_at": ISO time}.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from kvmesh.services.enginesim.timing import TimingModel

# Measured with `python -m bench.fastpath` on the 2-vCPU development VM (2026-12-02, load
# average 13-17): one client reading batches of 32 x 2 MiB into its own buffers with the
# client library from a `kvmesh cachenode` process over the bulk data plane on loopback, one
# call in flight (gRPC BatchGet alone gave 0.36 here). Used only when no benchmark wrote a
# rate file on this machine.
MEASURED_LOOPBACK_GBPS = 1.68
MEASURED_LOOPBACK_SOURCE = "kvmesh data plane on loopback, batch_get_into of 32 x 2 MiB, measured on the development VM"

# A production cache node's network: 100 Gb/s.
NIC_GBPS = 12.5

ENV_FILE = "KVMESH_POOL_RATE_FILE"


def default_rate_file() -> Path:
    """$KVMESH_POOL_RATE_FILE, else ~/.cache/kvmesh/pool-rate.json."""
    configured = os.environ.get(ENV_FILE)
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmesh" / "pool-rate.json"


@dataclass(frozen=True)
class PoolRate:
    """A transfer rate and where it comes from (printed next to every figure derived from it)."""

    gbps: float
    source: str

    def describe(self) -> str:
        return f"{self.gbps:.2f} GB/s ({self.source})"


def save_pool_rate(path: Path, gbps: float, source: str) -> None:
    """Written by benchmarks; read by `load_pool_rate`."""
    if not gbps > 0:
        raise ValueError(f"a pool rate must be positive, got {gbps}")
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        "pool_gbps": round(gbps, 4),
        "source": source,
        "host": socket.gethostname(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path.write_text(json.dumps(doc, indent=1) + "\n")


def load_pool_rate(path: Path | None = None) -> PoolRate:
    """The rate in `path` (default file), or the committed measurement when there is none.

    A file that exists but cannot be read raises ValueError: a wrong rate must not pass silently.
    """
    path = path if path is not None else default_rate_file()
    if not path.exists():
        return PoolRate(MEASURED_LOOPBACK_GBPS, MEASURED_LOOPBACK_SOURCE + f"; no {path}")
    try:
        doc = json.loads(path.read_text())
        gbps = float(doc["pool_gbps"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a pool-rate file ({exc})") from exc
    if not gbps > 0:
        raise ValueError(f"{path}: pool_gbps must be positive, got {gbps}")
    source = str(doc.get("source", "measured"))
    when = doc.get("measured_at")
    return PoolRate(gbps, f"{source}, {when}, from {path}" if when else f"{source}, from {path}")


def resolve_pool_rate(gbps: float | None, rate_file: Path | None) -> PoolRate:
    """`--pool-gbps` when given, else the rate file's figure."""
    if gbps is not None:
        if not gbps > 0:
            raise ValueError(f"--pool-gbps must be positive, got {gbps}")
        return PoolRate(gbps, "--pool-gbps")
    return load_pool_rate(rate_file)


def break_even_report(timing: TimingModel, rate: PoolRate, nic_gbps: float = NIC_GBPS) -> str:
    """Where fetching beats recomputing for the simulated model and GPU, next to what kvmesh delivers."""
    even = timing.break_even_gbps()
    verdict = "fetching beats recomputing" if rate.gbps > even else "recomputing beats fetching"
    return (
        f"pool transfer rate: {rate.describe()}\n"
        f"break-even for the simulated model and GPU ({timing.params_billion:g}B params, "
        f"{timing.kv_bytes_per_token // 1024} KiB KV/token, {timing.peak_tflops:g} TFLOPS x {timing.mfu:g} MFU): "
        f"fetching beats recomputing above {even:.2f} GB/s; kvmesh delivers {rate.gbps:.2f} GB/s "
        f"({rate.gbps / even:.2f}x break-even: {verdict}); a production NIC {nic_gbps:g} GB/s "
        f"({nic_gbps / even:.1f}x)"
    )
