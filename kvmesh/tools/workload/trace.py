"""Mooncake-format request traces and the hit-rate bound of one infinite cache.

A trace is JSON lines: `timestamp` (ms since the start), `input_length` and `output_length`
(tokens) and `hash_ids`, the chained ids of the prompt's 512-token blocks (the last one may
be partial). Two requests sharing a hash id share the whole prefix up to that block.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]

    def to_json(self) -> str:
        return json.dumps(
            {
                "timestamp": self.timestamp_ms,
                "input_length": self.input_length,
                "output_length": self.output_length,
                "hash_ids": list(self.hash_ids),
            }
        )


class TraceError(ValueError):
    """A trace line is not a valid request."""


def parse_request(line: str, lineno: int = 0) -> TraceRequest:
    try:
        row = json.loads(line)
        ts = float(row["timestamp"])
        inp = int(row["input_length"])
        out = int(row["output_length"])
        ids = tuple(int(h) for h in row["hash_ids"])
    except (ValueError, KeyError, TypeError) as exc:
        raise TraceError(f"line {lineno}: not a trace request ({exc})") from None
    if ts < 0 or inp < 1 or out < 0 or any(h < 0 or h > 0xFFFFFFFFFFFFFFFF for h in ids):
        raise TraceError(f"line {lineno}: negative or out-of-range field")
    return TraceRequest(ts, inp, max(out, 1), ids)


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRequest]:
    """Reads a trace (blank lines skipped), sorted by timestamp, at most `limit` requests."""
    out: list[TraceRequest] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            out.append(parse_request(line, lineno))
            if limit is not None and len(out) >= limit:
                break
    out.sort(key=lambda r: r.timestamp_ms)
    return out


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in requests:
            f.write(r.to_json() + "\n")


def infinite_cache_hits(requests: Sequence[TraceRequest]) -> list[int]:
    """Per request, the prompt blocks one cache that never evicts would serve (ids seen before)."""
    seen: set[int] = set()
    out: list[int] = []
    for r in requests:
        hits = 0
        for h in r.hash_ids:
            if h in seen:
                hits += 1
            else:
                seen.add(h)
        out.append(hits)
    return out


def infinite_cache_bound(requests: Sequence[TraceRequest]) -> float:
    """Fraction of prompt blocks a single cache that never evicts would serve from cache.

    A block hits when its id was seen before (chained ids make every seen block part of a seen
    prefix, so this also counts prefix hits only). No router or finite cache can beat it.
    """
    seen: set[int] = set()
    total = hits = 0
    for r in requests:
        for h in r.hash_ids:
            total += 1
            if h in seen:
                hits += 1
            else:
                seen.add(h)
    return hits / total if total else 0.0
