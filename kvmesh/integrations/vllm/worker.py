"""The connector's worker side: copies blocks between vLLM's paged KV tensors and the mesh.

Loads run before the forward pass and wait for the mesh (at most `load_timeout_s`): a block that
is missing, late, of another layout or fails its checksum is not copied, and it and every later
block of its request are reported to vLLM as failed, so vLLM recomputes them. Saves copy the
finished blocks out of the paged tensors on the engine thread (a memcpy, so vLLM may reuse the
blocks at once) and hand the network work to the link's thread; the engine never waits for it.
A request whose load failed this step saves nothing this step (its KV was computed over blocks
that are about to be recomputed).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from kvmesh.client.cache import CacheClient
from kvmesh.integrations.link import MeshLink
from kvmesh.integrations.vllm.codec import BlockCodec
from kvmesh.integrations.vllm.keys import shard_key
from kvmesh.integrations.vllm.plan import StepPlan
from kvmesh.integrations.vllm.settings import ConnectorSettings
from kvmesh.integrations.vllm.stats import ConnectorStats

# Under "vllm." so the lines show in vLLM's own log output, formatted as vLLM formats its own.
log = logging.getLogger("vllm.kvmesh")


# The data-plane seam: the two calls that move block values. They use the client's batched gRPC /
# shared-memory paths today; a bulk path that reads into (and writes from) caller-owned buffers
# replaces them here and nowhere else.
async def fetch_values(client: CacheClient, keys: list[bytes]) -> list[bytes | None]:
    return await client.get_many(keys)


async def store_values(client: CacheClient, items: list[tuple[bytes, bytes]]) -> int:
    return await client.put_many(items)


@dataclass(frozen=True)
class LayerSlot:
    """Where one layer's share of a block lives: in its tensor (`dim` indexes blocks) and in the
    block's payload (`offset`, `nbytes`)."""

    name: str
    tensor: torch.Tensor
    dim: int
    offset: int
    nbytes: int


def layer_slots(kv_caches: dict[str, torch.Tensor], num_blocks: int) -> tuple[list[LayerSlot], bytes]:
    """Each layer's slot (layers in name order) and the layout description sealed in every value.
    Raises ValueError when a tensor has no block dimension (dim 0 or 1 of size `num_blocks`)."""
    slots: list[LayerSlot] = []
    layout: list[object] = []
    offset = 0
    for name in sorted(kv_caches):
        tensor = kv_caches[name]
        dims = [d for d in (0, 1) if d < tensor.dim() and tensor.shape[d] == num_blocks]
        if not dims:
            raise ValueError(f"layer {name}: no block dimension of size {num_blocks} in {tuple(tensor.shape)}")
        dim = dims[0]
        shape = [s for d, s in enumerate(tensor.shape) if d != dim]
        nbytes = tensor.element_size() * int(torch.Size(shape).numel())
        slots.append(LayerSlot(name, tensor, dim, offset, nbytes))
        layout.append([name, str(tensor.dtype), shape])
        offset += nbytes
    return slots, json.dumps(layout, separators=(",", ":")).encode()


class WorkerSide:
    def __init__(self, settings: ConnectorSettings, link: MeshLink, stats: ConnectorStats,
                 rank: int, shards: int, num_blocks: int) -> None:
        self._settings = settings
        self._link = link
        self._stats = stats
        self._rank = rank
        self._shards = shards
        self._num_blocks = num_blocks
        self._slots: list[LayerSlot] = []
        self._codec: BlockCodec | None = None
        self._load_errors: set[int] = set()
        self._failed_requests: set[str] = set()

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            self._slots, layout = layer_slots(kv_caches, self._num_blocks)
        except ValueError as exc:
            log.warning("kvmesh connector disabled: unsupported KV cache layout (%s)", exc)
            return
        self._codec = BlockCodec(layout, sum(s.nbytes for s in self._slots))
        log.info("kvmesh connector: %d layers, %d bytes per block value", len(self._slots), self._codec.value_bytes)

    def _key(self, key: bytes) -> bytes:
        return shard_key(key, self._rank, self._shards)

    # -- loads ----------------------------------------------------------------------------

    def load(self, plan: StepPlan) -> None:
        self._failed_requests = set()
        if not plan.loads:
            return
        keys = [self._key(k) for t in plan.loads for k in t.keys]
        started = time.monotonic()
        payloads = self._fetch(keys)
        seconds = time.monotonic() - started
        at = 0
        loaded = failed = 0
        for transfer in plan.loads:
            mine = payloads[at : at + len(transfer.keys)]
            at += len(transfer.keys)
            good = next((i for i, p in enumerate(mine) if p is None), len(mine))
            if good:
                self._copy_in(transfer.block_ids[:good], mine[:good])
            if good < len(mine):
                self._load_errors.update(transfer.block_ids[good:])
                self._failed_requests.add(transfer.request_id)
            loaded += good
            failed += len(mine) - good
        codec_bytes = self._codec.value_bytes if self._codec else 0
        self._stats.add(loaded_blocks=loaded, loaded_bytes=loaded * codec_bytes, load_seconds=seconds,
                        failed_load_blocks=failed)

    def _fetch(self, keys: list[bytes]) -> list[memoryview | None]:
        codec = self._codec
        if codec is None:
            return [None] * len(keys)

        async def fetch(client: CacheClient) -> tuple[list[memoryview | None], int]:
            values = await fetch_values(client, keys)
            out: list[memoryview | None] = []
            corrupt: list[bytes] = []
            for key, value in zip(keys, values, strict=True):
                payload = None if value is None else codec.open(key, value)
                if value is not None and payload is None:
                    corrupt.append(key)
                out.append(payload)
            for key in corrupt:  # drop it so the next request recomputes and stores a sound copy
                await client.delete(key)
            return out, len(corrupt)

        answer = self._link.call(fetch, self._settings.load_timeout_s)
        if answer is None:
            return [None] * len(keys)
        payloads, corrupt = answer
        if corrupt:
            log.warning("kvmesh connector: %d block value(s) failed their checksum; recomputing", corrupt)
            self._stats.add(corrupt_blocks=corrupt)
        return payloads

    def _copy_in(self, block_ids: list[int], payloads: list[memoryview | None]) -> None:
        assert self._codec is not None
        size = self._codec.payload_bytes
        buf = bytearray(size * len(payloads))
        for i, payload in enumerate(payloads):
            assert payload is not None
            buf[i * size : (i + 1) * size] = payload
        rows = torch.frombuffer(buf, dtype=torch.uint8).view(len(payloads), size)
        for slot in self._slots:
            ids = torch.tensor(block_ids, dtype=torch.long, device=slot.tensor.device)
            part = rows[:, slot.offset : slot.offset + slot.nbytes].contiguous().view(slot.tensor.dtype)
            shape = [s for d, s in enumerate(slot.tensor.shape) if d != slot.dim]
            src = part.view(len(payloads), *shape).to(slot.tensor.device).movedim(0, slot.dim)
            slot.tensor.index_copy_(slot.dim, ids, src)

    def take_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    # -- saves ----------------------------------------------------------------------------

    def save(self, plan: StepPlan) -> None:
        codec = self._codec
        transfers = [t for t in plan.saves if t.request_id not in self._failed_requests and t.keys]
        if codec is None or not transfers:
            return
        block_ids = [b for t in transfers for b in t.block_ids]
        keys = [self._key(k) for t in transfers for k in t.keys]
        rows = self._copy_out(block_ids)
        started = time.monotonic()

        async def put(client: CacheClient) -> None:
            items = [(key, codec.seal(key, memoryview(rows[i]))) for i, key in enumerate(keys)]
            stored = await store_values(client, items)
            self._stats.add(saved_blocks=stored, saved_bytes=stored * codec.value_bytes,
                            save_seconds=time.monotonic() - started, failed_save_blocks=len(items) - stored)

        if not self._link.submit(put):
            self._stats.add(dropped_save_blocks=len(keys))

    def _copy_out(self, block_ids: list[int]) -> np.ndarray:
        """The blocks' payloads, one row of bytes per block, in a buffer of our own."""
        parts = []
        for slot in self._slots:
            ids = torch.tensor(block_ids, dtype=torch.long, device=slot.tensor.device)
            part = slot.tensor.index_select(slot.dim, ids).movedim(slot.dim, 0).contiguous()
            parts.append(part.view(torch.uint8).reshape(len(block_ids), -1).cpu())
        table = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()
        return table.numpy()
