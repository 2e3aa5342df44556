"""Group commit for submissions: concurrent callers share INSERT statements.

While a statement is in flight, the submissions that arrive queue up and go together in the
next one, so under load one round trip, one commit and one wake-up notification serve many
callers, and at low load a submission goes out at once (no timer, no added delay: a drain takes
what is queued right now). Each caller's tasks stay one all-or-nothing unit: they are never
split across statements, and a caller is answered only after the commit that holds its rows.

A drain keeps one connection (a ``Session``) while callers keep arriving, instead of a pool
checkout per statement. When a shared statement fails with anything but ``Unavailable``
(something in one caller's rows the database refused), each caller of it is tried alone, so
that caller gets its own error and the others their tasks. ``Unavailable`` (the connection or
the database went away) is every caller's answer: none of them was committed."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager

from hashmesh.core import metrics
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.model import NewTask, Submitted

SubmitMany = Callable[[Sequence[NewTask]], Awaitable[list[Submitted]]]
Session = Callable[[], AbstractAsyncContextManager[SubmitMany]]
"""Opens what one drain submits through (the store: one pooled connection)."""
Waiting = tuple[Sequence[NewTask], asyncio.Future[list[Submitted]]]
STATEMENTS_PER_SESSION = 16
"""Then the connection goes back to the pool and the drain queues for one like any reader: on a
small pool, reads and key checks get their turn under sustained submissions."""


class SubmitCoalescer:
    def __init__(
        self, session: Session, *, max_tasks: int = 10_000, max_in_flight: int = 2
    ) -> None:
        self._session = session
        self._max_tasks = max_tasks
        self._max_in_flight = max_in_flight
        self._queue: deque[Waiting] = deque()
        self._in_flight = 0
        self._drains: set[asyncio.Task[None]] = set()
        """The running drains, kept so the event loop's weak reference is not their only one."""
        self.statements = 0
        """Statements sent so far (for tests and benchmarks)."""

    @property
    def waiting(self) -> int:
        """Callers queued for the next statement (not those in flight)."""
        return len(self._queue)

    async def submit(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Submitted]] = loop.create_future()
        self._queue.append((tasks, future))
        metrics.TASK_SUBMIT_WAITING.inc()
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            drain = loop.create_task(self._drain(), name="submit-coalescer")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        return await future

    def _take(self) -> list[Waiting]:
        taken: list[Waiting] = []
        size = 0
        while self._queue and (not taken or size + len(self._queue[0][0]) <= self._max_tasks):
            tasks, future = self._queue.popleft()
            metrics.TASK_SUBMIT_WAITING.dec()
            if future.cancelled():
                continue  # the caller gave up before anything was sent
            taken.append((tasks, future))
            size += len(tasks)
        return taken

    async def _drain(self) -> None:
        try:
            while self._queue:
                taken: list[Waiting] = []
                opened = False
                try:
                    async with self._session() as submit_many:
                        opened = True
                        for _ in range(STATEMENTS_PER_SESSION):
                            if not (taken := self._take()):
                                break
                            await self._send(submit_many, taken)
                        taken = []
                except Exception as exc:
                    # A statement failed: its callers learn why, the rest go on in a fresh
                    # session. No session to be had: the queued would wait for the same.
                    _fail(taken if opened else self._take_all(), exc)
        finally:
            self._in_flight -= 1

    def _take_all(self) -> list[Waiting]:
        everything: list[Waiting] = []
        while taken := self._take():
            everything += taken
        return everything

    async def _send(self, submit_many: SubmitMany, taken: list[Waiting]) -> None:
        self.statements += 1
        metrics.TASK_SUBMIT_STATEMENTS.inc()
        metrics.TASK_SUBMIT_CALLS.inc(len(taken))
        try:
            answers = await submit_many([task for tasks, _ in taken for task in tasks])
        except Unavailable:
            raise  # every caller's: the session is done (the drain opens another)
        except Exception as exc:
            if len(taken) == 1:
                _fail(taken, exc)
                return
            for one in taken:  # find whose rows were refused: each caller alone
                await self._send(submit_many, [one])
            return
        start = 0
        for tasks, future in taken:
            if not future.done():
                future.set_result(answers[start : start + len(tasks)])
            start += len(tasks)


def _fail(taken: list[Waiting], exc: BaseException) -> None:
    for _, future in taken:
        if not future.done():
            future.set_exception(exc)
