"""`memory://?arena=shm` — the memory storage's region in a named POSIX shared-memory segment.

A client on the same host maps the same segment (`/dev/shm/<name>`) and reads and writes
values in place: the zero-copy local path. Python's `multiprocessing.shared_memory` is not
used on purpose: on 3.11 every process that opens a segment registers it with the resource
tracker, which unlinks it when *that* process exits, so a client would delete the node's
memory. Plain `os.open` + `mmap` under /dev/shm has no such side effect.

The segment is named `kvmesh-<pid>-<random>`: the node unlinks it on close, and a node that
was SIGKILLed leaves a file whose pid is dead, which the next node on the host removes
(`remove_stale_segments`). The file is unlinked as soon as `close()` runs; mappings that
clients still hold stay valid until they unmap (POSIX semantics), so nobody crashes.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
from pathlib import Path

from kvmesh.runtime.errors import ResourceExhausted
from kvmesh.services.cachenode.storage.arena import (
    DEFAULT_ALIGNMENT,
    ExtentAllocator,
    HeapArena,
    MappedArena,
    alignment_of,
)
from kvmesh.units import format_size
from kvmesh.uri import Uri

log = logging.getLogger("kvmesh.cachenode.shm")

SHM_DIR = Path("/dev/shm")
SEGMENT_PREFIX = "kvmesh-"


def segment_path(name: str) -> Path:
    """Where a segment lives; `name` must be a plain file name."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad shared-memory segment name {name!r}")
    return SHM_DIR / name


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_segments(directory: Path = SHM_DIR) -> list[str]:
    """Unlinks `kvmesh-<pid>-*` segments whose node process no longer exists."""
    removed: list[str] = []
    for path in directory.glob(f"{SEGMENT_PREFIX}*"):
        parts = path.name.split("-")
        if len(parts) != 3 or not parts[1].isdigit():
            continue
        if _pid_alive(int(parts[1])):
            continue
        with contextlib.suppress(FileNotFoundError, PermissionError):
            path.unlink()
            removed.append(path.name)
    if removed:
        log.info("removed stale shared-memory segments: %s", ", ".join(removed))
    return removed


class ShmArena(MappedArena):
    """An arena whose bytes are a shared-memory segment other processes on the host can map.

    Views, allocation and unmapping are `MappedArena`'s; this adds the segment's name and
    unlinks it on close.
    """

    def __init__(self, capacity: int, alignment: int = DEFAULT_ALIGNMENT, prefault: bool = False) -> None:
        allocator = ExtentAllocator(capacity, alignment)
        size = max(allocator.capacity, 1)
        remove_stale_segments()
        free = _free_bytes(SHM_DIR)
        if size > free:
            raise ResourceExhausted(
                f"shared-memory arena of {format_size(size)} does not fit in {SHM_DIR} "
                f"({format_size(free)} free): lower capacity= or use arena=heap"
            )
        self.name = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = segment_path(self.name)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            if prefault:
                # Reserves the pages now: a full /dev/shm fails here with ENOSPC instead of a
                # SIGBUS on first write later.
                os.posix_fallocate(fd, 0, size)
            else:
                os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            raise
        os.close(fd)
        super().__init__(allocator, mapping)
        self.size = size

    @classmethod
    def create(cls, capacity: int, uri: Uri | None = None) -> ShmArena:
        prefault = uri.bool_param("prefault", False) if uri is not None else False
        return cls(capacity, alignment_of(uri), prefault)

    def close(self) -> None:
        if self._map is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        super().close()


def _free_bytes(directory: Path) -> int:
    st = os.statvfs(directory)
    return st.f_bavail * st.f_frsize


class AutoArena:
    """`arena=auto` (the memory storage's default): shared memory when /dev/shm has room, else heap.

    Containers often mount a small /dev/shm (Docker's default is 64 MiB): there the node still
    starts, on the heap, and simply offers no zero-copy path.
    """

    @classmethod
    def create(cls, capacity: int, uri: Uri | None = None) -> ShmArena | HeapArena:
        try:
            fits = SHM_DIR.is_dir() and capacity <= _free_bytes(SHM_DIR)
        except OSError:
            fits = False
        if fits:
            try:
                return ShmArena.create(capacity, uri)
            except OSError as exc:
                log.warning("shared-memory arena unavailable (%s): using the heap", exc)
        else:
            log.info("%s cannot hold %s: the memory storage uses the heap", SHM_DIR, format_size(capacity))
        return HeapArena.create(capacity, uri)
