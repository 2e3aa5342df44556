"""Retention: how long finished tasks are kept, and the pruner that deletes them.

Policy (pure values, validated) and the run loop live here; the statements are the store's
(``prune`` in ``core/queue/sql/tasks.sql``). Any number of processes may run a ``Pruner``: each run
first takes an advisory lock, so one prunes and the others skip that round."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from hashmesh.core import metrics
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.model import TaskStatus
from hashmesh.core.settings import SettingsError, env_float, env_int

log = logging.getLogger(__name__)

HOUR = 3600.0
DAY = 24 * HOUR


@dataclass(frozen=True)
class RetentionPolicy:
    """How long each final status is kept after ``finished_at``, and how the pruner works."""

    succeeded_seconds: float = DAY
    """Succeeded tasks are deleted this long after they finished; their results and their
    idempotency keys go with them (``HASHMESH_RETENTION_SUCCEEDED_SECONDS``; 0 keeps them
    forever)."""
    cancelled_seconds: float = DAY
    """Cancelled tasks (``HASHMESH_RETENTION_CANCELLED_SECONDS``; 0 keeps them forever)."""
    dead_letter_seconds: float = 7 * DAY
    """Dead letters wait for someone to read or requeue them, so they are kept longest
    (``HASHMESH_RETENTION_DEAD_LETTER_SECONDS``; 0 keeps them forever)."""
    batch_size: int = 1000
    """Rows per DELETE: each batch is its own short transaction that skips locked rows
    (``HASHMESH_RETENTION_BATCH``)."""
    interval_seconds: float = 60.0
    """Seconds between pruner runs in each workerd; one of them wins each run
    (``HASHMESH_RETENTION_INTERVAL_SECONDS``; 0 turns the pruner off in this process)."""

    def __post_init__(self) -> None:
        for name in ("succeeded_seconds", "cancelled_seconds", "dead_letter_seconds"):
            if getattr(self, name) < 0:
                raise SettingsError(f"retention {name} must be >= 0 (0 keeps forever)")
        if not 1 <= self.batch_size <= 100_000:
            raise SettingsError("HASHMESH_RETENTION_BATCH must be between 1 and 100000")
        if self.interval_seconds < 0:
            raise SettingsError("HASHMESH_RETENTION_INTERVAL_SECONDS must be >= 0")

    @property
    def ages(self) -> dict[TaskStatus, float]:
        """Age after which each final status goes; a status kept forever is left out."""
        ages = {
            TaskStatus.SUCCEEDED: self.succeeded_seconds,
            TaskStatus.CANCELLED: self.cancelled_seconds,
            TaskStatus.DEAD_LETTER: self.dead_letter_seconds,
        }
        return {status: age for status, age in ages.items() if age > 0}

    @classmethod
    def from_env(cls) -> RetentionPolicy:
        return cls(
            succeeded_seconds=env_float(
                "RETENTION_SUCCEEDED_SECONDS", cls.succeeded_seconds, minimum=0.0
            ),
            cancelled_seconds=env_float(
                "RETENTION_CANCELLED_SECONDS", cls.cancelled_seconds, minimum=0.0
            ),
            dead_letter_seconds=env_float(
                "RETENTION_DEAD_LETTER_SECONDS", cls.dead_letter_seconds, minimum=0.0
            ),
            batch_size=env_int("RETENTION_BATCH", cls.batch_size, minimum=1),
            interval_seconds=env_float(
                "RETENTION_INTERVAL_SECONDS", cls.interval_seconds, minimum=0.0
            ),
        )


@dataclass(frozen=True)
class PruneRun:
    """One pruner run: rows deleted per status (or, for a dry run, rows due)."""

    deleted: dict[TaskStatus, int] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.deleted.values())


class PruningStore(Protocol):
    async def prune(self, ages: Mapping[TaskStatus, float], *, batch: int) -> PruneRun | None: ...


class Pruner:
    """Runs ``store.prune`` every ``policy.interval_seconds`` until cancelled. Construct
    without I/O."""

    def __init__(
        self,
        store: PruningStore,
        policy: RetentionPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._policy = policy
        self._clock = clock

    async def run_once(self) -> PruneRun | None:
        """One run; ``None`` when another process holds the pruner's lock."""
        started = self._clock()
        result = await self._store.prune(self._policy.ages, batch=self._policy.batch_size)
        if result is None:
            return None
        seconds = self._clock() - started
        metrics.TASK_PRUNE_SECONDS.observe(seconds)
        for status, n in result.deleted.items():
            metrics.TASKS_PRUNED.labels(status.value).inc(n)
        log.info(
            "pruned finished tasks",
            extra={
                "deleted": result.total,
                **{f"deleted_{s.value}": n for s, n in result.deleted.items()},
                "batches": result.batches,
                "seconds": round(seconds, 3),
            },
        )
        return result

    @property
    def enabled(self) -> bool:
        return self._policy.interval_seconds > 0 and bool(self._policy.ages)

    async def run(self) -> None:
        """Every ``interval_seconds`` until cancelled (returns at once when not ``enabled``)."""
        if not self.enabled:
            return
        while True:
            await asyncio.sleep(self._policy.interval_seconds)
            try:
                await self.run_once()
            except Unavailable as exc:
                log.warning("pruner run failed", extra={"reason": exc.message})
