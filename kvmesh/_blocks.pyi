"""Native half of blocks.py (`_blocks.c`): chained keyed BLAKE2b-128."""

from collections.abc import Sequence

from typing_extensions import Buffer

def ids(keys: Sequence[bytes], /) -> list[int]: ...

class Chain:
    def __init__(self, key: Buffer, prefix: Buffer) -> None: ...
    def keys(self, raw: Buffer, step: int, parent: Buffer, /) -> list[bytes]: ...
