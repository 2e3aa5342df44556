"""Backpressure: limits on unfinished tasks, globally and per client.

Counting unfinished rows on every submission would cost more than the submission itself, so
each hashd keeps the counts from one grouped query, refreshed in the background at most every
``refresh_seconds``, plus what it accepted itself since. Across replicas the limit can thus be
overshot by what other replicas accept within one refresh interval; a batch is admitted or
refused as a whole, before anything is stored."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from hashmesh.core.errors import HashmeshError, ResourceExhausted

log = logging.getLogger(__name__)


class PendingLimits:
    def __init__(
        self,
        *,
        max_total: int,
        max_per_client: int,
        count: Callable[[], Awaitable[dict[str, int]]],
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.refresh_seconds = refresh_seconds
        self._count = count
        self._clock = clock
        self._counted: dict[str, int] | None = None
        self._counted_at = float("-inf")
        self._accepted: Counter[str] = Counter()
        self._refreshing: asyncio.Task[None] | None = None

    def check(self, client_id: str, n: int) -> None:
        """Raise ``ResourceExhausted`` when ``n`` more tasks of ``client_id`` would pass a limit."""
        counted = self._counted or {}
        total = sum(counted.values()) + sum(self._accepted.values())
        if total + n > self.max_total:
            raise ResourceExhausted(
                f"the queue holds {total} unfinished tasks; the limit is {self.max_total}",
                retry_after=self.refresh_seconds,
                reason="QUEUE_FULL",
            )
        mine = counted.get(client_id, 0) + self._accepted[client_id]
        if mine + n > self.max_per_client:
            raise ResourceExhausted(
                f"client {client_id!r} has {mine} unfinished tasks; the limit per client is "
                f"{self.max_per_client}",
                retry_after=self.refresh_seconds,
                reason="CLIENT_QUEUE_FULL",
            )

    async def admit(self, client_id: str, n: int) -> None:
        """Check with counts no older than the refresh interval (the first call waits for
        them; later ones refresh in the background)."""
        if self._counted is None:
            await self._refresh()
        elif self._clock() - self._counted_at >= self.refresh_seconds and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        self.check(client_id, n)

    def accepted(self, client_id: str, n: int) -> None:
        """Count tasks this process stored since the last refresh."""
        self._accepted[client_id] += n

    async def _refresh(self) -> None:
        started = self._clock()
        accepted_before = Counter(self._accepted)
        try:
            counted = await self._count()
        except HashmeshError as exc:
            log.warning("could not count unfinished tasks", extra={"reason": exc.message})
            return
        finally:
            self._refreshing = None
        self._counted = counted
        self._counted_at = started
        # What was accepted before the count started is in the count now.
        self._accepted.subtract(accepted_before)
        self._accepted = +self._accepted

    async def stop(self) -> None:
        task = self._refreshing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
