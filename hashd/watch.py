"""The watch hub: one LISTEN connection per hashd, fanned out to every WatchTask stream.

The database announces status changes on ``hashmesh_task_status`` (statement-level triggers,
payload ``id status,id status,...``). The hub reads them, fetches the watched tasks among them
in one query, and hands each watcher ``(notified status, task)``. When the LISTEN connection
drops (PostgreSQL restarted), every watcher is told to re-read its task (``None``), since
notifications may have been missed, and the hub reconnects with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from hashmesh.core.backoff import backoff_delay
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.model import TaskRecord, TaskStatus, TaskStore
from hashmesh.core.queue.store import NOTIFY_STATUS, Listener

log = logging.getLogger(__name__)

Update = tuple[TaskStatus, TaskRecord] | None
"""A status change with the task as read after it, or ``None``: re-read the task yourself."""


def parse_status_payload(payload: str) -> list[tuple[str, TaskStatus]]:
    """``"id status,id status"`` → [(id, status)]; malformed entries are skipped."""
    changes = []
    for entry in payload.split(","):
        task_id, _, status = entry.strip().partition(" ")
        with contextlib.suppress(ValueError):
            changes.append((task_id, TaskStatus(status)))
    return changes


class Subscription:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self._updates: asyncio.Queue[Update] = asyncio.Queue()

    def put(self, update: Update) -> None:
        self._updates.put_nowait(update)

    async def next(self, timeout: float) -> Update:
        """The next update; ``None`` on timeout or resync (re-read the task)."""
        try:
            return await asyncio.wait_for(self._updates.get(), timeout)
        except TimeoutError:
            return None


class WatchHub:
    """Construct without I/O; ``start()`` runs the listener in the background."""

    def __init__(self, dsn: str, store: TaskStore) -> None:
        self._store = store
        self._listener = Listener(dsn, [NOTIFY_STATUS], name="hashd-watch")
        self._subscribers: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._dispatching: set[asyncio.Task[None]] = set()

    @property
    def connected(self) -> bool:
        """False while the LISTEN connection is down: the database is probably unreachable."""
        return self._listener.connected

    @property
    def watchers(self) -> int:
        return sum(len(s) for s in self._subscribers.values())

    async def start(self, timeout: float = 5.0) -> None:
        """Start listening; waits (up to ``timeout``) for the first connection attempt."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="watch-hub")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first_attempt.wait(), timeout)

    async def stop(self) -> None:
        for dispatch in list(self._dispatching):
            dispatch.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self._listener.close()

    @contextlib.contextmanager
    def subscribe(self, task_id: str) -> Iterator[Subscription]:
        sub = Subscription(task_id)
        self._subscribers.setdefault(task_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(task_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[task_id]

    async def _run(self) -> None:
        failures = 0
        while True:
            try:
                if not self._listener.connected:
                    try:
                        await self._listener.connect()
                    finally:
                        self._first_attempt.set()
                    if failures:
                        log.info("watch hub reconnected", extra={"watchers": self.watchers})
                        self._resync_all()
                    failures = 0
                notes = await self._listener.wait(timeout=5.0)
            except Unavailable as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "watch hub lost its LISTEN connection", extra={"reason": exc.message}
                    )
                    self._resync_all()
                await asyncio.sleep(backoff_delay(failures, 0.05, 1.0))
                continue
            if notes:
                # Reads run concurrently, so a slow one does not hold back the next changes;
                # watchers drop a state older than one they already streamed.
                changes = [c for _, payload in notes for c in parse_status_payload(payload)]
                dispatch = asyncio.get_running_loop().create_task(self._dispatch(changes))
                self._dispatching.add(dispatch)
                dispatch.add_done_callback(self._dispatching.discard)

    async def _dispatch(self, changes: list[tuple[str, TaskStatus]]) -> None:
        watched = [(task_id, status) for task_id, status in changes if task_id in self._subscribers]
        if not watched:
            return
        try:
            records = {r.id: r for r in await self._store.get_many(sorted({t for t, _ in watched}))}
        except Unavailable:
            self._resync_all()
            return
        for task_id, status in watched:
            record = records.get(task_id)
            for sub in self._subscribers.get(task_id, ()):
                sub.put((status, record) if record is not None else None)

    def _resync_all(self) -> None:
        for subs in self._subscribers.values():
            for sub in subs:
                sub.put(None)
