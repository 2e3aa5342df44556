"""What one workerd reports to Prometheus: claims, outcomes and submit→final latency per
algorithm. The metric objects live in ``hashmesh.core.metrics``; this module only feeds them.

Label children are bound once per algorithm at start (a closed enum, so the series exist at 0
from the first scrape), and the hot path is a dict lookup and an ``inc``. Task ids never become
labels; an algorithm name outside the enum is recorded as ``unknown``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from hashmesh.core import metrics
from hashmesh.core.hashing.algorithms import Algorithm
from hashmesh.core.queue.model import ClaimedTask, Outcome, TaskStatus


@dataclass(frozen=True)
class _AlgorithmMetrics:
    """The label children of one algorithm."""

    claimed: Any
    succeeded: Any
    failed: Any
    dead_lettered: Any
    latency_succeeded: Any
    latency_dead_letter: Any

    @classmethod
    def bind(cls, algorithm: str) -> _AlgorithmMetrics:
        return cls(
            claimed=metrics.TASKS_CLAIMED.labels(algorithm),
            succeeded=metrics.TASKS_SUCCEEDED.labels(algorithm),
            failed=metrics.TASKS_FAILED.labels(algorithm),
            dead_lettered=metrics.TASKS_DEAD_LETTERED.labels(algorithm),
            latency_succeeded=metrics.TASK_LATENCY_SECONDS.labels(algorithm, "succeeded"),
            latency_dead_letter=metrics.TASK_LATENCY_SECONDS.labels(algorithm, "dead_letter"),
        )


class WorkerMetrics:
    """Records a worker's events. Cancellations are not recorded here: most of them happen in
    hashd (pending tasks), so a worker-side count would be a misleading fraction."""

    def __init__(self) -> None:
        self._by_algorithm = {a.value: _AlgorithmMetrics.bind(a.value) for a in Algorithm}
        self._unknown: _AlgorithmMetrics | None = None

    def _of(self, algorithm: str) -> _AlgorithmMetrics:
        found = self._by_algorithm.get(algorithm)
        if found is not None:
            return found
        if self._unknown is None:
            self._unknown = _AlgorithmMetrics.bind(metrics.UNKNOWN)
        return self._unknown

    def claimed(self, tasks: Iterable[ClaimedTask]) -> None:
        """One claim batch: one ``inc(n)`` per algorithm in it."""
        for algorithm, n in Counter(t.algorithm for t in tasks).items():
            self._of(algorithm).claimed.inc(n)

    def completed(self, outcomes: Iterable[Outcome]) -> None:
        """Results written. A result whose task was cancelled meanwhile is not a success."""
        for outcome in outcomes:
            if outcome.status is TaskStatus.SUCCEEDED:
                children = self._of(outcome.algorithm)
                children.succeeded.inc()
                if outcome.latency_seconds is not None:
                    children.latency_succeeded.observe(max(0.0, outcome.latency_seconds))

    def failed(self, outcomes: Iterable[Outcome]) -> None:
        """Failed attempts recorded: by this worker, or leases found expired (the holder died),
        which count as failed attempts too. The last one dead-letters its task."""
        for outcome in outcomes:
            children = self._of(outcome.algorithm)
            children.failed.inc()
            if outcome.status is TaskStatus.DEAD_LETTER:
                children.dead_lettered.inc()
                if outcome.latency_seconds is not None:
                    children.latency_dead_letter.observe(max(0.0, outcome.latency_seconds))
