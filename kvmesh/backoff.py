"""Full-jitter exponential backoff capped by a deadline: every retry loop in kvmesh uses it."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Backoff:
    """Delays of `uniform(0, min(cap, base * 2**attempt))`, so retrying clients never synchronise."""

    base_s: float = 0.05
    cap_s: float = 2.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap_s, self.base_s * (2 ** min(attempt, 30))))

    async def attempts(self, deadline_s: float | None = None) -> AsyncIterator[int]:
        """Yields attempt numbers, sleeping between them, until the deadline (None: forever).

        The first attempt starts at once. The caller breaks out on success.
        """
        end = None if deadline_s is None else time.monotonic() + deadline_s
        attempt = 0
        while True:
            yield attempt
            pause = self.delay(attempt)
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    return
                pause = min(pause, left)
            await asyncio.sleep(pause)
            attempt += 1
