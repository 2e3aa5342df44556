"""The balancer's counters, in one place a metrics exporter or AdminService can read.

Updating a counter is a plain attribute increment on the event loop thread (no locks: one
loop owns them all). Percentiles are computed on demand from a fixed window of recent
latencies, so recording a call allocates nothing."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from hashmesh.balancer.budgets import BudgetSnapshot


class LatencyWindow:
    """The last ``size`` latencies, in seconds, in a ring."""

    __slots__ = ("_count", "_next", "_size", "_values")

    def __init__(self, size: int = 1024) -> None:
        self._values = [0.0] * size
        self._size = size
        self._next = 0
        self._count = 0

    def record(self, seconds: float) -> None:
        index = self._next
        self._values[index] = seconds
        self._next = index + 1 if index + 1 < self._size else 0
        if self._count < self._size:
            self._count += 1

    def percentile(self, fraction: float) -> float:
        if not self._count:
            return 0.0
        ordered = sorted(self._values[: self._count])
        return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class ReplicaStats:
    """Counters of one replica."""

    __slots__ = ("calls", "ejections", "errors", "ewma", "latencies")

    EWMA_WEIGHT = 0.2

    def __init__(self, window: int = 1024) -> None:
        self.calls = 0
        self.errors = 0
        self.ejections = 0
        self.ewma = 0.0
        self.latencies = LatencyWindow(window)

    def record(self, seconds: float | None, ok: bool) -> None:
        """One finished call; ``seconds`` is ``None`` for calls whose length is not a latency
        (response streams such as WatchTask), kept out of the percentiles and the EWMA."""
        self.calls += 1
        if not ok:
            self.errors += 1
        if seconds is None:
            return
        self.latencies.record(seconds)
        ewma = self.ewma
        self.ewma = seconds if ewma == 0.0 else ewma + self.EWMA_WEIGHT * (seconds - ewma)


@dataclass(frozen=True)
class ReplicaSnapshot:
    address: str
    source: str
    state: str
    in_flight: int
    calls: int
    errors: int
    ejections: int
    p50: float
    p99: float
    ewma: float


@dataclass(frozen=True)
class Snapshot:
    """A consistent reading of every counter, for AdminService.GetStats and metrics."""

    calls: int
    retries: int
    no_backend: int
    rate_limited: int
    uptime: float
    strategy: str
    replicas: Sequence[ReplicaSnapshot]
    top_refused: Sequence[tuple[str, int]]
    unauthenticated: int = 0
    budgets: BudgetSnapshot | None = None
    """What peers hold of the budgets (``None``: not read)."""


class BalancerStats:
    """Counters of the whole balancer; per-replica counters live on each replica's
    ``ReplicaStats`` and per-peer refusals in the rate limiter, read through ``snapshot``."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.calls = 0
        self.retries = 0
        self.no_backend = 0
        self.unauthenticated = 0
