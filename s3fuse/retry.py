"""Retry delays: exponential backoff with full jitter, shared by the S3 backend and the
Transit client.

Full jitter (a delay drawn uniformly from [0, min(cap, base * 2^n)]) spreads the retries of
many clients that failed together, so they do not return to a recovering server in step.
Pure: the callers sleep, and decide what is worth retrying.
"""

from __future__ import annotations

import random
from collections.abc import Iterator


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """The delay before retry number `attempt` (1-based)."""
    return random.uniform(0, min(cap, base * (2 ** (attempt - 1))))


class Backoff:
    """Full-jitter delays, bounded by a number of attempts, a total time budget, or both."""

    def __init__(self, base: float, cap: float, budget: float | None = None,
                 attempts: int | None = None) -> None:
        self.base, self.cap, self.budget, self.attempts = base, cap, budget, attempts

    def delay(self, attempt: int) -> float:
        return full_jitter(attempt, self.base, self.cap)

    def delays(self) -> Iterator[float]:
        """Sleep lengths between attempts; ends when the attempts or the budget are spent."""
        spent, attempt = 0.0, 0
        while self.attempts is None or attempt + 1 < self.attempts:
            delay = self.delay(attempt + 1)
            if self.budget is not None and spent + delay > self.budget:
                return
            spent += delay
            attempt += 1
            yield delay
