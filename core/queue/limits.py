"""Backpressure: limits on unfinished tasks, globally and per client, counted in tasks and in
cost (``task_cost``: the work a task asks of the worker pool), and who may use which priority.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from hashmesh.core.errors import HashmeshError, InvalidArgument, ResourceExhausted

log = logging.getLogger(__name__)

TASK_OVERHEAD_COST = 4096
"""Cost every task adds besides its work: a queue of empty inputs is not free."""
ARGON2 = "argon2id"


def task_cost(algorithm: str, params: Mapping[str, Any], input_size: int) -> int:
    """Work units of one task: argon2id fills ``memory_cost_kib`` KiB ``time_cost`` times (in
    bytes), a digest reads its input once (in bytes). The SQL query
    ``unfinished_cost_by_client`` reads the same sum from counters kept in the database
    (``hashmesh_task_cost``, migration 0006)."""
    if algorithm == ARGON2:
        return int(params["time_cost"]) * int(params["memory_cost_kib"]) * 1024 + TASK_OVERHEAD_COST
    return input_size + TASK_OVERHEAD_COST


class PriorityCaps:
    """The highest priority each client may ask for: ``default`` for everyone, ``overrides``
    for the clients an operator named. Who may jump the queue is configuration."""

    def __init__(self, default: int, overrides: Mapping[str, int] | None = None) -> None:
        self.default = default
        self.overrides = dict(overrides or {})

    def check(self, client_id: str, priority: int, field: str) -> None:
        cap = self.overrides.get(client_id, self.default)
        if priority > cap:
            raise InvalidArgument(
                field,
                f"must be at most {cap} for client {client_id!r}; higher priorities are given "
                "per client by the operator (HASHMESH_PRIORITY_OVERRIDES)",
            )


@dataclass
class Reservation:
    """What a call admitted by ``PendingLimits.reserve`` stored in the end."""

    tasks: int = 0
    cost: int = 0

    def stored(self, tasks: int, cost: int = 0) -> None:
        self.tasks, self.cost = tasks, cost


class PendingLimits:
    def __init__(
        self,
        *,
        max_total: int,
        max_per_client: int,
        count: Callable[[], Awaitable[dict[str, int]]],
        cost: Callable[[], Awaitable[dict[str, int]]] | None = None,
        max_cost_total: int | None = None,
        max_cost_per_client: int | None = None,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_total = max_total
        self.max_per_client = max_per_client
        self.max_cost_total = max_cost_total
        self.max_cost_per_client = max_cost_per_client
        self._cost = cost
        self._costed: dict[str, int] = {}
        self._accepted_cost: Counter[str] = Counter()
        self.refresh_seconds = refresh_seconds
        self._count = count
        self._clock = clock
        self._counted: dict[str, int] | None = None
        self._counted_at = float("-inf")
        self._accepted: Counter[str] = Counter()
        self._reserved: Counter[str] = Counter()
        """Admitted by ``reserve`` and not answered yet: counted by every check meanwhile."""
        self._reserved_cost: Counter[str] = Counter()
        self._refreshing: asyncio.Task[None] | None = None

    def check(self, client_id: str, n: int, cost: int = 0) -> None:
        """Raise ``ResourceExhausted`` when ``n`` more tasks of ``client_id`` costing ``cost``
        would pass a limit."""
        counted = self._counted or {}
        total = sum(counted.values()) + sum(self._accepted.values()) + sum(self._reserved.values())
        if total + n > self.max_total:
            raise ResourceExhausted(
                f"the queue holds {total} unfinished tasks; the limit is {self.max_total}",
                retry_after=self.refresh_seconds,
                reason="QUEUE_FULL",
            )
        mine = counted.get(client_id, 0) + self._accepted[client_id] + self._reserved[client_id]
        if mine + n > self.max_per_client:
            raise ResourceExhausted(
                f"client {client_id!r} has {mine} unfinished tasks; the limit per client is "
                f"{self.max_per_client}",
                retry_after=self.refresh_seconds,
                reason="CLIENT_QUEUE_FULL",
            )
        if cost:
            self._check_cost(client_id, cost)

    def _check_cost(self, client_id: str, cost: int) -> None:
        if self.max_cost_total is not None:
            total = (
                sum(self._costed.values())
                + sum(self._accepted_cost.values())
                + sum(self._reserved_cost.values())
            )
            if total + cost > self.max_cost_total:
                raise ResourceExhausted(
                    f"the queue holds {total} units of work; the limit is {self.max_cost_total} "
                    "(HASHMESH_MAX_PENDING_COST)",
                    retry_after=self.refresh_seconds,
                    reason="QUEUE_FULL",
                )
        if self.max_cost_per_client is not None:
            mine = (
                self._costed.get(client_id, 0)
                + self._accepted_cost[client_id]
                + self._reserved_cost[client_id]
            )
            if mine + cost > self.max_cost_per_client:
                raise ResourceExhausted(
                    f"client {client_id!r} has {mine} units of work queued and asks for {cost} more; "
                    f"the limit per client is {self.max_cost_per_client} (HASHMESH_MAX_PENDING_COST_PER_CLIENT)",
                    retry_after=self.refresh_seconds,
                    reason="CLIENT_QUEUE_FULL",
                )

    async def admit(self, client_id: str, n: int, cost: int = 0) -> None:
        """Check with counts no older than the refresh interval (the first call waits for
        them; later ones refresh in the background)."""
        if self._counted is None:
            # One count for every call that arrives before the first one is back, not one
            # each: 64 calls in flight at start would otherwise send 128 statements.
            if self._refreshing is None:
                self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
            await asyncio.shield(self._refreshing)
        elif self._clock() - self._counted_at >= self.refresh_seconds and self._refreshing is None:
            self._refreshing = asyncio.get_running_loop().create_task(self._refresh())
        self.check(client_id, n, cost)

    @contextlib.asynccontextmanager
    async def reserve(self, client_id: str, n: int, cost: int = 0) -> AsyncIterator[Reservation]:
        """``admit``, then hold ``n`` tasks and ``cost`` against the limits until the block
        ends, when what the block reported as stored counts as accepted instead."""
        await self.admit(client_id, n, cost)
        self._reserved[client_id] += n
        self._reserved_cost[client_id] += cost
        reservation = Reservation()
        try:
            yield reservation
        finally:
            self._reserved[client_id] -= n
            self._reserved_cost[client_id] -= cost
            if not self._reserved[client_id]:
                del self._reserved[client_id]
            if not self._reserved_cost[client_id]:
                del self._reserved_cost[client_id]
            if reservation.tasks or reservation.cost:
                self.accepted(client_id, reservation.tasks, reservation.cost)

    def accepted(self, client_id: str, n: int, cost: int = 0) -> None:
        """Count tasks (and their cost) this process stored since the last refresh."""
        self._accepted[client_id] += n
        if cost:
            self._accepted_cost[client_id] += cost

    async def _refresh(self) -> None:
        started = self._clock()
        accepted_before = Counter(self._accepted)
        cost_before = Counter(self._accepted_cost)
        try:
            counted = await self._count()
            costed = await self._cost() if self._cost is not None else {}
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
        self._costed = costed
        self._accepted_cost.subtract(cost_before)
        self._accepted_cost = +self._accepted_cost

    async def stop(self) -> None:
        task = self._refreshing
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
