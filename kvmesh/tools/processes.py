"""One `kvmesh` child process, for `kvmesh up`, the test helpers and the benchmarks.

`KvmeshProcess` starts `python -m kvmesh <subcommand> ...` (the console script's entry point) in
its own session (a terminal's Ctrl-C reaches only the parent), reads its output on a thread (kept
for assertions and error reports, optionally copied to a log file), parses its `KVMESH_READY`
line, and stops it with SIGTERM, then SIGKILL for its whole process group if it does not stop in
time. `die_with_parent=True` asks Linux to SIGTERM it when the parent dies, even by SIGKILL, so
nothing is orphaned (`kvmesh up` does); a parent already running gRPC threads must not, since the
preexec hook forces a plain fork() under them.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

READY_PREFIX = "KVMESH_READY"


def kvmesh_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for child processes: no inherited KVMESH_* flags (they are meant for the
    parent). Children import the installed kvmesh package, as the console script does."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec hook asking Linux to SIGTERM the child when its parent dies. Resolved once,
    before any fork, so the child runs only a pre-resolved prctl call."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def hook() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return hook


_PREEXEC = _die_with_parent()


class KvmeshProcess:
    """One `kvmesh` subprocess with captured output and its parsed ready line."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        name: str | None = None,
        *,
        role: str = "",
        log_dir: Path | None = None,
        keep_lines: int | None = None,
        die_with_parent: bool = False,
    ) -> None:
        self.args = [sys.executable, "-m", "kvmesh", *args]
        self.name = name or args[0]
        self.role = role or args[0]
        # All output for tests; a bounded tail for long-running supervisors (`keep_lines`).
        self.lines: collections.deque[str] = collections.deque(maxlen=keep_lines)
        self.address: str | None = None
        self.ready: dict[str, str] = {}
        self._ready = threading.Event()
        self._log = open(log_dir / f"{self.name}.log", "a", encoding="utf-8") if log_dir else None  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.args,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=kvmesh_env(env),
            start_new_session=True,
            preexec_fn=_PREEXEC if die_with_parent else None,
        )
        self._reader = threading.Thread(target=self._read, name=f"read-{self.name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()
            if line.startswith(READY_PREFIX) and not self._ready.is_set():
                self.ready = dict(part.split("=", 1) for part in line.split()[1:] if "=" in part)
                self.address = self.ready.get("address")
                self._ready.set()
        self._ready.set()

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.lines)[-lines:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait_ready(self, timeout: float = 20.0) -> str:
        """Waits for the ready line; returns the advertised address. Kills the child if none came."""
        if not self._ready.wait(timeout) or self.address is None:
            self.kill()
            raise RuntimeError(f"{self.name} did not become ready:\n{self.tail(40)}")
        return self.address

    def running(self) -> bool:
        return self.proc.poll() is None

    def send_term(self) -> None:
        """SIGTERM without waiting (a supervisor stops a whole group of members, then waits)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> bool:
        """True once the process exited; False if it still runs after `timeout` seconds."""
        try:
            self.proc.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        self.send_term()
        if not self.wait(timeout):
            self.kill()
        self._reader.join(2)
        return int(self.proc.returncode)

    def kill(self) -> None:
        """SIGKILL the process and any children it started (its whole process group)."""
        if self.running():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)

    def wait_exit(self, timeout: float) -> int:
        """The exit code once it exits (output fully read), or -1 if it still runs after `timeout`."""
        if not self.wait(timeout):
            return -1
        self._reader.join(5)
        return int(self.proc.returncode)

    def close(self) -> None:
        """Releases the output pipe and the log file (after the process exited)."""
        self._reader.join(2)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._log is not None:
            self._log.close()
