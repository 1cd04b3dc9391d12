"""The connector's counters: logged now and then, and written to a small JSON file when asked
(`stats_dir`), so tests and operators see what the mesh gave this engine."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# Under "vllm." so the lines show in vLLM's own log output, formatted as vLLM formats its own.
log = logging.getLogger("vllm.kvmesh")


@dataclass
class Counters:
    lookups: int = 0
    lookup_hit_blocks: int = 0
    lookup_failures: int = 0
    loaded_blocks: int = 0
    loaded_bytes: int = 0
    load_seconds: float = 0.0
    failed_load_blocks: int = 0
    corrupt_blocks: int = 0
    saved_blocks: int = 0
    saved_bytes: int = 0
    save_seconds: float = 0.0
    failed_save_blocks: int = 0
    dropped_save_blocks: int = 0


class ConnectorStats:
    """Thread-safe counters (the engine thread loads, the link thread saves)."""

    def __init__(self, role: str, stats_dir: str | None, log_interval_s: float) -> None:
        self.role = role
        self._counters = Counters()
        self._lock = threading.Lock()
        self._path = Path(stats_dir) / f"kvmesh-vllm-{role}-{os.getpid()}.json" if stats_dir else None
        self._log_interval_s = log_interval_s
        self._last_log = time.monotonic()

    def add(self, **deltas: float) -> None:
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._counters, name, getattr(self._counters, name) + delta)
            snapshot = asdict(self._counters)
        self._publish(snapshot)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return asdict(self._counters)

    def _publish(self, snapshot: dict[str, float]) -> None:
        if self._path is not None:
            tmp = self._path.with_suffix(f".tmp{threading.get_ident()}")
            try:
                tmp.write_text(json.dumps(snapshot))
                os.replace(tmp, self._path)
            except OSError as exc:
                log.debug("kvmesh stats file: %s", exc)
        now = time.monotonic()
        if now - self._last_log >= self._log_interval_s:
            self._last_log = now
            log.info("kvmesh connector (%s): %s", self.role, summary(snapshot))


def rate(nbytes: float, seconds: float) -> str:
    return f"{nbytes / seconds / 1e6:.1f} MB/s" if seconds > 0 else "n/a"


def summary(s: dict[str, float]) -> str:
    return (f"loaded {int(s['loaded_blocks'])} blocks ({rate(s['loaded_bytes'], s['load_seconds'])}), "
            f"saved {int(s['saved_blocks'])} ({rate(s['saved_bytes'], s['save_seconds'])}), "
            f"failed loads {int(s['failed_load_blocks'])}, corrupt {int(s['corrupt_blocks'])}, "
            f"dropped saves {int(s['dropped_save_blocks'])}")
