"""The watch hub: one LISTEN connection per hashd, fanned out to every WatchTask stream.

The database announces status changes on ``hashmesh_task_status`` (statement-level triggers of
migration 0006): the payload is a JSON array of the changed tasks as stored (a ``TaskRecord``'s
columns), so the hub hands each watcher ``(status, task)`` straight from the notification, with
no read. Entries too long for a notification come as ``{"id", "status"}`` only (and the
pre-0006 payload ``id status,...`` is still understood): those tasks are read in one query.
When the LISTEN connection drops (PostgreSQL restarted), every watcher is told to re-read its
task (``None``), since notifications may have been missed, and the hub reconnects with
backoff."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Container, Iterator
from datetime import datetime
from typing import Any

from hashmesh.core.backoff import STATEMENT
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.model import Notifications, TaskRecord, TaskStatus, TaskStore

log = logging.getLogger(__name__)

MAX_SCANNED_WATCHERS = 32
"""Up to this many watched tasks, a notification is searched for their ids before it is
parsed (ids are canonical lowercase UUIDs on both sides)."""

Update = tuple[TaskStatus, TaskRecord] | None
"""A status change with the task as read after it, or ``None``: re-read the task yourself."""


Change = tuple[str, TaskStatus, TaskRecord | None]
"""(task id, status, the task as notified, or ``None``: read it)."""

_TIMES = ("created_at", "run_after", "started_at", "finished_at")


def record_from_notice(entry: dict[str, Any]) -> TaskRecord:
    """A task from a notification entry (JSON: hex digest, ISO 8601 times)."""
    row = dict(entry)
    digest = row.get("result_digest")
    row["result_digest"] = None if digest is None else bytes.fromhex(digest)
    for name in _TIMES:
        if row.get(name) is not None:
            row[name] = datetime.fromisoformat(row[name])
    return TaskRecord.from_row(row)


def parse_status_payload(payload: str, wanted: Container[str] | None = None) -> list[Change]:
    """A notification's changes (of the ``wanted`` ids only, when given: nobody watches most
    tasks, so their records are not built); malformed entries are skipped, and an entry that
    does not make a whole ``TaskRecord`` comes with ``None`` (to be read)."""
    if not payload.startswith("["):  # the pre-0006 form: "id status,id status"
        changes: list[Change] = []
        for text in payload.split(","):
            task_id, _, status = text.strip().partition(" ")
            with contextlib.suppress(ValueError):
                changes.append((task_id, TaskStatus(status), None))
        return changes
    try:
        entries = json.loads(payload)
    except ValueError:
        return []
    found: list[Change] = []
    for entry in entries if isinstance(entries, list) else []:
        try:
            task_id, status = str(entry["id"]), TaskStatus(entry["status"])
        except (TypeError, KeyError, ValueError):
            continue
        if wanted is not None and task_id not in wanted:
            continue
        record = None
        with contextlib.suppress(KeyError, TypeError, ValueError):
            record = record_from_notice(entry) if "algorithm" in entry else None
        found.append((task_id, status, record))
    return found


class Subscription:
    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self._updates: asyncio.Queue[Update] = asyncio.Queue()

    def put(self, update: Update) -> None:
        self._updates.put_nowait(update)

    async def next(self, timeout: float) -> Update:
        """The next update; ``None`` on timeout or resync (re-read the task)."""
        try:
            # Not wait_for: that wraps the get in a task of its own, one more event-loop turn
            # between the notification and the watcher's answer.
            async with asyncio.timeout(timeout):
                return await self._updates.get()
        except TimeoutError:
            return None


class WatchHub:
    """Construct without I/O; ``start()`` runs the listener in the background."""

    def __init__(self, listener: Notifications, store: TaskStore) -> None:
        """``listener`` LISTENs on ``NOTIFY_STATUS`` (``Listener`` on PostgreSQL)."""
        self._store = store
        self._listener = listener
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
                await asyncio.sleep(STATEMENT.delay(failures))
                continue
            if notes and self._subscribers:
                self.deliver(
                    [
                        change
                        for _, payload in notes
                        if self._may_concern(payload)
                        for change in parse_status_payload(payload, self._subscribers)
                    ]
                )

    def _may_concern(self, payload: str) -> bool:
        """False when no watched id appears in the payload: most notifications are of tasks
        nobody watches, and parsing their JSON was a tenth of hashd's CPU under batch load.
        With many watchers, scanning the text once per watcher would cost more than parsing."""
        if len(self._subscribers) > MAX_SCANNED_WATCHERS:
            return True
        return any(task_id in payload for task_id in self._subscribers)

    def deliver(self, changes: list[Change]) -> None:
        """Hand each watcher its task's changes, in order: at once when the notifications
        carried the task, else (any change of that task without it) after one read for all
        such tasks, in the background."""
        watched = [c for c in changes if c[0] in self._subscribers]
        unread = {task_id for task_id, _, record in watched if record is None}
        for task_id, status, record in watched:
            if task_id not in unread and record is not None:
                for sub in self._subscribers[task_id]:
                    sub.put((status, record))
        if unread:
            # Reads run concurrently, so a slow one does not hold back the next changes;
            # watchers drop a state older than one they already streamed.
            to_read = [c for c in watched if c[0] in unread]
            dispatch = asyncio.get_running_loop().create_task(self._read_and_dispatch(to_read))
            self._dispatching.add(dispatch)
            dispatch.add_done_callback(self._dispatching.discard)

    async def _read_and_dispatch(self, watched: list[Change]) -> None:
        try:
            ids = sorted({task_id for task_id, _, record in watched if record is None})
            records = {r.id: r for r in await self._store.get_many(ids)}
        except Unavailable:
            self._resync_all()
            return
        for task_id, status, notified in watched:
            record = notified or records.get(task_id)
            for sub in self._subscribers.get(task_id, ()):
                sub.put((status, record) if record is not None else None)

    def _resync_all(self) -> None:
        for subs in self._subscribers.values():
            for sub in subs:
                sub.put(None)
