"""Native half of decode.py (`_decode.c`)."""

from typing import Any

def decode_batch(payload: bytes | bytearray | memoryview, /) -> tuple[float, list[tuple[Any, ...]], int]: ...
