"""Caller-provided buffers as flat byte views: bytes-likes, numpy arrays, CPU torch tensors.

`get_into`/`put_from` read into and write from the caller's memory without an extra copy;
this is where that memory becomes a `memoryview` of unsigned bytes. A torch tensor (CPU,
pinned or not) is viewed through `.numpy()` after a byte reinterpretation, so bfloat16
tensors work too; a CUDA tensor is refused (the rdma:// tier moves device memory).
"""

from __future__ import annotations

import sys
from typing import Any


def _torch_view(tensor: Any) -> memoryview:
    torch = sys.modules["torch"]
    if tensor.device.type != "cpu":
        raise TypeError(f"a {tensor.device.type} tensor cannot be read or written by the CPU: copy it to a CPU tensor")
    tensor = tensor.detach()
    if not tensor.is_contiguous():
        raise ValueError("tensor buffers must be contiguous")
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def byte_view(buffer: Any, *, writable: bool) -> memoryview:
    """A C-contiguous view of `buffer` as unsigned bytes; raises TypeError/ValueError when it cannot be one."""
    torch = sys.modules.get("torch")
    view = _torch_view(buffer) if torch is not None and isinstance(buffer, torch.Tensor) else memoryview(buffer)
    if not view.c_contiguous:
        raise ValueError("buffers must be C-contiguous")
    if writable and view.readonly:
        raise ValueError("a read-only buffer cannot receive a value")
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view
