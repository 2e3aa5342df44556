"""Group commit for submissions: concurrent callers share INSERT statements.

While a statement is in flight, the submissions that arrive queue up and go together in the
next one, so under load one round trip, one commit and one wake-up notification serve many
callers, and at low load a submission goes out at once (no timer, no added delay). Each
caller's tasks stay one all-or-nothing unit: they are never split across statements."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from hashmesh.core.queue.model import NewTask, Submitted

SubmitMany = Callable[[Sequence[NewTask]], Awaitable[list[Submitted]]]


class SubmitCoalescer:
    def __init__(
        self, submit_many: SubmitMany, *, max_tasks: int = 10_000, max_in_flight: int = 2
    ) -> None:
        self._submit_many = submit_many
        self._max_tasks = max_tasks
        self._max_in_flight = max_in_flight
        self._queue: deque[tuple[Sequence[NewTask], asyncio.Future[list[Submitted]]]] = deque()
        self._in_flight = 0
        self._drains: set[asyncio.Task[None]] = set()
        """The running drains, kept so the event loop's weak reference is not their only one."""
        self.statements = 0
        """Statements sent so far (for tests and benchmarks)."""

    async def submit(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        future: asyncio.Future[list[Submitted]] = asyncio.get_running_loop().create_future()
        self._queue.append((tasks, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            drain = asyncio.get_running_loop().create_task(self._drain(), name="submit-coalescer")
            self._drains.add(drain)
            drain.add_done_callback(self._drains.discard)
        return await future

    def _take(self) -> list[tuple[Sequence[NewTask], asyncio.Future[list[Submitted]]]]:
        taken: list[tuple[Sequence[NewTask], asyncio.Future[list[Submitted]]]] = []
        size = 0
        while self._queue and (not taken or size + len(self._queue[0][0]) <= self._max_tasks):
            tasks, future = self._queue.popleft()
            if future.cancelled():
                continue  # the caller gave up before anything was sent
            taken.append((tasks, future))
            size += len(tasks)
        return taken

    async def _drain(self) -> None:
        try:
            while taken := self._take():
                combined = [task for tasks, _ in taken for task in tasks]
                self.statements += 1
                try:
                    answers = await self._submit_many(combined)
                except Exception as exc:  # every caller of the statement gets it
                    for _, future in taken:
                        if not future.done():
                            future.set_exception(exc)
                    continue
                start = 0
                for tasks, future in taken:
                    if not future.done():
                        future.set_result(answers[start : start + len(tasks)])
                    start += len(tasks)
        finally:
            self._in_flight -= 1
