"""Native half of shards.py (`_shards.c`)."""

from collections.abc import Sequence
from typing import Any

def update(shards: list[dict[Any, Any]], keys: Sequence[Any], values: Sequence[Any], by_value: bool, /) -> int: ...
def fill(shards: list[dict[Any, Any]], keys: Sequence[Any], value: Any, by_value: bool, /) -> int: ...
