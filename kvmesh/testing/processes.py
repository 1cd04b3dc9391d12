"""Runs kvmesh services as real processes through the `kvmesh` command.

`KvmeshProcess` starts `python -m kvmesh <subcommand> ...` (the console script's entry
point), waits for its `KVMESH_READY` line, and stops it with SIGTERM (or SIGKILL for
failure tests). Output is kept for assertions and for failure reports.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kvmesh_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: this checkout importable, no inherited KVMESH_* flags."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


class KvmeshProcess:
    """One `kvmesh` subprocess with captured output."""

    def __init__(self, args: Sequence[str], env: dict[str, str] | None = None, name: str | None = None) -> None:
        self.args = [sys.executable, "-m", "kvmesh", *args]
        self.name = name or args[0]
        self.lines: list[str] = []
        self.address: str | None = None
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=kvmesh_env(env),
            cwd=ROOT,
            start_new_session=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if line.startswith("KVMESH_READY") and not self._ready.is_set():
                for part in line.split():
                    if part.startswith("address="):
                        self.address = part.split("=", 1)[1]
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 20.0) -> str:
        """Waits for the ready line; returns the advertised address."""
        if not self._ready.wait(timeout) or self.address is None:
            self.kill()
            raise RuntimeError(f"{self.name} did not become ready:\n{self.output[-4000:]}")
        return self.address

    def running(self) -> bool:
        return self.proc.poll() is None

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._reader.join(2)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL the process and any children it started."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def wait_exit(self, timeout: float) -> int:
        end = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < end:
            time.sleep(0.05)
        code = self.proc.poll()
        return -1 if code is None else int(code)
