"""What the scheduler side tells the workers each step: which blocks to load before the forward
pass and which to save after it (vLLM-free, so it is plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockTransfer:
    """Blocks of one request: `keys[i]` (unsharded mesh key) goes to/from paged block `block_ids[i]`."""

    request_id: str
    keys: list[bytes]
    block_ids: list[int]


@dataclass
class StepPlan:
    loads: list[BlockTransfer] = field(default_factory=list)
    saves: list[BlockTransfer] = field(default_factory=list)
