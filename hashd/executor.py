"""A bounded executor for CPU-heavy work (argon2) that refuses instead of queueing.

``BoundedExecutor(workers, queue)`` admits at most ``workers + queue`` calls at once: ``workers``
run on threads (argon2-cffi releases the GIL, so they run in parallel with the event loop), the
rest wait. One more is refused at once with ``ResourceExhausted`` whose retry hint is how long
the queue ahead should take to drain, estimated from recent run times.

A call whose deadline passes while it waits is dropped before it starts (``DeadlineExceeded``);
a call whose caller went away (the awaiting task was cancelled) is dropped too.

Stable interface: ``await executor.run(fn, *args, deadline=None)``; ``shutdown()``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from hashmesh.core import metrics
from hashmesh.core.errors import DeadlineExceeded, ResourceExhausted

T = TypeVar("T")

_EWMA_WEIGHT = 0.2


class BoundedExecutor:
    """Threads for CPU-bound functions with an admission bound. Construct, then ``run``."""

    def __init__(self, workers: int, queue: int, *, name: str = "hashd-cpu") -> None:
        if workers < 1 or queue < 0:
            raise ValueError("need workers >= 1 and queue >= 0")
        self.workers = workers
        self.limit = workers + queue
        self.admitted = 0
        self.refused = 0
        self._avg_seconds = 0.1
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        # Read at scrape time; one executor per hashd process, so the last one built reports.
        metrics.HASHD_CPU_QUEUE.set_function(self.queued)

    def queued(self) -> int:
        """Admitted calls waiting for a thread (not running yet)."""
        return max(0, self.admitted - self.workers)

    def retry_after(self) -> float:
        """Seconds until a slot is likely free: the work ahead divided over the threads."""
        waves = max(1, self.admitted - self.workers + 1) / self.workers
        return round(min(30.0, max(0.05, waves * self._avg_seconds)), 3)

    async def run(self, fn: Callable[..., T], *args: object, deadline: float | None = None) -> T:
        """Run ``fn(*args)`` on a thread; refuse at once when full. ``deadline`` is a
        ``time.monotonic()`` value after which the call is not started."""
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded("deadline passed before the work started")
        if self.admitted >= self.limit:
            self.refused += 1
            metrics.HASHD_CPU_REFUSED.inc()
            raise ResourceExhausted(
                f"CPU executor full ({self.limit} calls admitted); retry later",
                retry_after=self.retry_after(),
            )
        self.admitted += 1
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._pool, self._timed, fn, args, deadline)
        finally:
            self.admitted -= 1

    def _timed(self, fn: Callable[..., T], args: tuple[object, ...], deadline: float | None) -> T:
        started = time.monotonic()
        if deadline is not None and started >= deadline:
            raise DeadlineExceeded("deadline passed while the work waited for a CPU thread")
        try:
            return fn(*args)
        finally:
            elapsed = time.monotonic() - started
            # A float store is atomic under the GIL; a lost update only blurs an estimate.
            self._avg_seconds += _EWMA_WEIGHT * (elapsed - self._avg_seconds)

    def shutdown(self) -> None:
        """Drop queued work that has not started; running work finishes on its thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)
