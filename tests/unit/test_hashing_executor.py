"""The bounded CPU executor of hashd (hashmesh.hashd.executor)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from hashmesh.core.errors import DeadlineExceeded, ResourceExhausted
from hashmesh.hashd.executor import BoundedExecutor


def test_refuses_at_once_when_full_and_recovers() -> None:
    async def scenario() -> None:
        executor = BoundedExecutor(workers=1, queue=1)
        release = threading.Event()
        running = [asyncio.ensure_future(executor.run(release.wait, 10)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(ResourceExhausted) as caught:
            await executor.run(time.sleep, 0)
        assert caught.value.retry_after > 0
        assert executor.refused == 1
        release.set()
        assert await asyncio.gather(*running) == [True, True]
        assert await executor.run(sum, [1, 2]) == 3
        executor.shutdown()

    asyncio.run(scenario())


def test_work_past_its_deadline_is_not_started() -> None:
    async def scenario() -> None:
        executor = BoundedExecutor(workers=1, queue=4)
        calls: list[str] = []
        with pytest.raises(DeadlineExceeded):
            await executor.run(calls.append, "late", deadline=time.monotonic() - 1)
        release = threading.Event()
        blocker = asyncio.ensure_future(executor.run(release.wait, 10))
        queued = asyncio.ensure_future(
            executor.run(calls.append, "queued", deadline=time.monotonic() + 0.05)
        )
        await asyncio.sleep(0.1)  # the queued call's deadline passes while it waits
        release.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await queued
        assert calls == []
        executor.shutdown()

    asyncio.run(scenario())


def test_cancelled_caller_drops_queued_work() -> None:
    async def scenario() -> None:
        executor = BoundedExecutor(workers=1, queue=4)
        calls: list[str] = []
        release = threading.Event()
        blocker = asyncio.ensure_future(executor.run(release.wait, 10))
        queued = asyncio.ensure_future(executor.run(calls.append, "x"))
        await asyncio.sleep(0.01)
        queued.cancel()
        await asyncio.sleep(0.01)
        release.set()
        await blocker
        await executor.run(time.sleep, 0)  # the thread has passed the dropped job by now
        assert calls == []
        assert executor.admitted == 0
        executor.shutdown()

    asyncio.run(scenario())
