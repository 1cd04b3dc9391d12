"""Caller-provided buffers as flat byte arrays, and the one copy between two of them.

`get_into` / `put_from` move a value between the cache's memory and memory the caller owns
(an inference engine's KV blocks) without an intermediate `bytes`. Callers hand in whatever
they have: a bytearray or memoryview, a numpy array, or a CPU torch tensor (pinned or not,
of any dtype). Each becomes a flat uint8 numpy array over the same memory; copies go through
`numpy.copyto`, which is a memcpy that releases the GIL, so a big batch is copied by a few
threads at once (`CopyPool`) while the event loop keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

Buffer = Any  # bytes-like, numpy array, or CPU torch tensor
# One core's memcpy moves far less than the memory can (here 5 GB/s against 7.5 with two
# threads): a big batch is copied by a few threads at once, each taking an equal byte share.
DEFAULT_COPY_THREADS = min(4, os.cpu_count() or 1)
MIN_SHARE_BYTES = 4 * 1024 * 1024  # a thread's share is at least this (smaller: not worth the hop)


def _torch_bytes(tensor: Any) -> np.ndarray:
    torch = sys.modules["torch"]  # a tensor exists, so torch is imported
    if tensor.device.type != "cpu":
        raise TypeError(f"a {tensor.device.type} tensor is not host memory: stage it through a (pinned) CPU tensor")
    if not tensor.is_contiguous():
        raise ValueError("the tensor is not contiguous: its bytes are not one region")
    flat = tensor.detach().reshape(-1)
    return np.asarray(flat.view(torch.uint8).numpy())


def as_bytes(buf: Buffer, *, writable: bool) -> np.ndarray:
    """A flat uint8 array sharing `buf`'s memory (no copy); TypeError/ValueError when it cannot."""
    if type(buf).__module__.partition(".")[0] == "torch":
        arr = _torch_bytes(buf)
    elif isinstance(buf, np.ndarray):
        if not buf.flags.c_contiguous:
            raise ValueError("the array is not C-contiguous: its bytes are not one region")
        arr = buf.reshape(-1).view(np.uint8)
    else:
        view = memoryview(buf)
        if not view.c_contiguous:
            raise ValueError("the buffer is not contiguous: its bytes are not one region")
        arr = np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np.uint8)
    if writable and not arr.flags.writeable:
        raise TypeError("the buffer is read-only: get_into needs memory it can write")
    return arr


def copy(dst: np.ndarray, src: np.ndarray | memoryview) -> None:
    """memcpy of len(src) bytes into the start of dst (both flat uint8)."""
    source = src if isinstance(src, np.ndarray) else np.frombuffer(src, dtype=np.uint8)
    np.copyto(dst[: len(source)], source)


def copy_all(pairs: Sequence[tuple[np.ndarray, np.ndarray | memoryview]]) -> None:
    """Several copies in one call (one thread hop for a whole batch)."""
    for dst, src in pairs:
        copy(dst, src)


def byte_view(buf: Buffer, *, writable: bool) -> memoryview:
    """`as_bytes` as a memoryview (what socket reads and writes take); same errors."""
    if type(buf) is bytearray or type(buf) is memoryview:  # already flat bytes: no numpy detour
        view = memoryview(buf)
        if view.format == "B" and view.ndim == 1 and view.c_contiguous and not (writable and view.readonly):
            return view
    return as_bytes(buf, writable=writable).data  # the array's own memoryview: no copy


def byte_shares(
    pairs: list[tuple[np.ndarray, np.ndarray | memoryview]], count: int
) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The copies of `pairs` cut into `count` lists of about equal bytes (a value may be cut in two)."""
    sources = [(dst, src if isinstance(src, np.ndarray) else np.frombuffer(src, dtype=np.uint8)) for dst, src in pairs]
    total = sum(len(src) for _, src in sources)
    shares: list[list[tuple[np.ndarray, np.ndarray]]] = [[] for _ in range(count)]
    target = -(-total // count)
    index, room = 0, target
    for dst, src in sources:
        start = 0
        while start < len(src):
            if room == 0 and index + 1 < count:
                index, room = index + 1, target
            take = len(src) - start if index + 1 == count else min(room, len(src) - start)
            shares[index].append((dst[start : start + take], src[start : start + take]))
            start += take
            room -= take
    return [share for share in shares if share]


class CopyPool:
    """Copies big batches on a few threads at once (numpy's memcpy releases the GIL).

    A caller that is cancelled still waits for its copies to end: no thread may write a
    buffer, or read a slot, once the caller has handed it back.
    """

    def __init__(self, threads: int = DEFAULT_COPY_THREADS) -> None:
        self.threads = max(1, threads)
        self._executor: ThreadPoolExecutor | None = None

    async def copy_all(self, pairs: list[tuple[np.ndarray, np.ndarray | memoryview]], total: int) -> None:
        count = max(1, min(self.threads, total // MIN_SHARE_BYTES))
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="kvmesh-copy")
        executor = self._executor
        futures = [asyncio.wrap_future(executor.submit(copy_all, share)) for share in byte_shares(pairs, count)]
        copies = asyncio.gather(*futures)
        try:
            await asyncio.shield(copies)
        except asyncio.CancelledError:
            await asyncio.wait(futures)
            raise

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False)
            self._executor = None
