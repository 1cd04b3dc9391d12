"""Resident memory of a process, read from /proc (Linux), for memory-bound tests and the soak bench."""

from __future__ import annotations

from pathlib import Path


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """The process's resident set size in bytes (0 when it is gone). `field="RssAnon"` counts
    only anonymous memory (heap), leaving out mapped files such as an LMDB store's pages."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0
