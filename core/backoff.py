"""Waiting before trying again: exponential backoff with full jitter, the one helper every
retry loop of the mesh uses (database reconnects, LISTEN connections, claims, write-backs,
the cache's secret and clear listener, ``hashctl up`` restarting a child that crashed).

Full jitter (AWS architecture blog, "Exponential Backoff And Jitter"): the delay before retry
``attempt`` (0 for the first) is uniform in ``[0, min(cap, base * 2**attempt)]``, so clients
that failed together do not come back together."""

from __future__ import annotations

import random
from dataclasses import dataclass


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap, base * (2 ** min(attempt, 64))))


@dataclass(frozen=True)
class Backoff:
    """A backoff policy: ``delay(attempt)`` seconds before retry ``attempt`` (0, 1, …)."""

    base: float
    """Upper bound of the first delay, in seconds; doubled per attempt."""
    cap: float
    """Largest delay, in seconds."""

    def __post_init__(self) -> None:
        if self.base < 0 or self.cap < self.base:
            raise ValueError(f"backoff needs 0 <= base <= cap, got {self.base}, {self.cap}")

    def delay(self, attempt: int) -> float:
        return backoff_delay(attempt, self.base, self.cap)


STATEMENT = Backoff(0.05, 2.0)
"""A statement that failed on a reachable-then-lost database (claims, write-backs, watch)."""
RECONNECT = Backoff(0.1, 2.0)
"""Opening a connection again (LISTEN, start-up) while the database is unreachable."""
RESTART = Backoff(0.5, 30.0)
"""Starting a crashed process again (``hashctl up``'s children and embedded PostgreSQL)."""
