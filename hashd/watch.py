"""The watch hub: one LISTEN connection per hashd, fanned out to every WatchTask stream.

The database announces status changes on ``hashmesh_task_status`` (statement-level triggers of
migration 0006): the payload is a JSON array of the changed tasks as stored (a ``TaskRecord``'s
columns), so the hub hands each watcher ``(status, task)`` straight from the notification, with
no read. Entries too long for a notification come as ``{"id", "status"}`` only (and the
pre-0006 payload ``id status,...`` is still understood): those tasks are read in one query.
When the LISTEN connection drops (PostgreSQL restarted), every watcher is told to re-read its
task (``None``), since notifications may have been missed, and the hub reconnects with
backoff.

While WatchTask calls come in, the hub also keeps each task's last notified state for
``RECENT_SECONDS`` (at most ``RECENT_MAX`` tasks), and a watch that starts meanwhile begins from
it instead of reading the table: a client usually opens its watch right after SubmitTask
returns, when the worker has often finished already (bench/task_trace.py), so the read was on
the critical path. Subscribing and looking up happen with no await in between, so every later
change reaches the subscription; a reconnect forgets everything (changes may have been
missed).

A submission that is watched from the start (SubmitAndWatchTask) does not know its task's id
until the insert returns, and by then the task may have been claimed, even finished. So the
caller opens ``catching_up()`` before it submits: while one is open, every notified state is
kept (up to ``HISTORY_PER_TASK`` per task), and ``subscribe(id, since=...)`` replays the
states notified since then into the new subscription, or, when some may have been dropped
meanwhile (the table of kept states overflowed, or the LISTEN connection reconnected), asks
the watcher to read the task (``None``).

The same connection carries other channels for their owners (``side_channels``: the result
cache's clears), so a hashd holds one LISTEN connection, not one per channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Container, Iterator, Mapping
from datetime import datetime
from typing import Any, Protocol

from hashmesh.core.backoff import STATEMENT
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.model import Notifications, TaskRecord, TaskStatus, TaskStore

log = logging.getLogger(__name__)

MAX_SCANNED_WATCHERS = 32
"""Up to this many watched tasks, a notification is searched for their ids before it is
parsed (ids are canonical lowercase UUIDs on both sides)."""

RECENT_SECONDS = 2.0
"""How long a notified state may start a watch. Short: only a deletion (retention) or a
forgotten idempotency key change a task without a notification."""
RECENT_MAX = 4096
"""Tasks whose last notified states are kept (the oldest go first)."""
HISTORY_PER_TASK = 8
"""Notified states kept per task (the newest): a task changes a few times a second at most."""
WATCHED_LATELY_SECONDS = 10.0
"""Notified states are kept only while a WatchTask call came within this long: a workload
without watchers does not pay for parsing every notification."""

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


def _record_of(entry: dict[str, Any]) -> TaskRecord | None:
    """The task an entry carries, or ``None`` (too long to be notified whole, or malformed)."""
    if "algorithm" not in entry:
        return None
    try:
        return record_from_notice(entry)
    except (KeyError, TypeError, ValueError):
        return None


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
    return changes_of(_entries(payload), wanted)


def _entries(payload: str) -> list[Any]:
    """The entries of a JSON payload (``[]`` when it is not one)."""
    try:
        entries = json.loads(payload)
    except ValueError:
        return []
    return entries if isinstance(entries, list) else []


def changes_of(entries: list[Any], wanted: Container[str] | None = None) -> list[Change]:
    """``parse_status_payload`` of a payload already decoded (``_entries``)."""
    found: list[Change] = []
    for entry in entries:
        try:
            task_id, status = str(entry["id"]), TaskStatus(entry["status"])
        except (TypeError, KeyError, ValueError):
            continue
        if wanted is not None and task_id not in wanted:
            continue
        found.append((task_id, status, _record_of(entry)))
    return found


class SideChannel(Protocol):
    """Another channel carried by the hub's LISTEN connection for someone else (the result
    cache's clears): PostgreSQL wakes every listening backend of the database at each commit
    that notifies, on whatever channel, so one connection fewer is a backend fewer woken three
    times per task. ``notified`` gets each payload; ``missed`` is called when the connection is
    back after a drop (some may have been lost meanwhile; not while it is down: the result
    cache's memory tier keeps answering while PostgreSQL is away)."""

    def notified(self, payload: str) -> None: ...
    def missed(self) -> None: ...


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

    def __init__(
        self,
        listener: Notifications,
        store: TaskStore,
        *,
        side_channels: Mapping[str, SideChannel] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``listener`` LISTENs on ``NOTIFY_STATUS`` (``Listener`` on PostgreSQL) and on each
        of ``side_channels``, whose notifications go to their handler (every other channel's
        are status changes); ``clock`` (seconds) ages the notified states kept for new
        watches."""
        self._clock = clock
        self._side_channels = dict(side_channels or {})
        self._store = store
        self._listener = listener
        self._subscribers: dict[str, set[Subscription]] = {}
        self._task: asyncio.Task[None] | None = None
        self._first_attempt = asyncio.Event()
        self._recent: OrderedDict[str, deque[tuple[float, dict[str, Any]]]] = OrderedDict()
        """Task id → its last notification entries with the (monotonic) time each came;
        tasks oldest first."""
        self._dropped_at = -math.inf
        """When the newest kept state that was dropped early (overflow, reconnect) came."""
        self._catching_up = 0
        """Open ``catching_up()`` blocks: while any is, every notified state is kept."""
        self._watched_at = -WATCHED_LATELY_SECONDS
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

    def recent(self, task_id: str, *, owner: str | None) -> TaskRecord | None:
        """The task's last notified state, if it is fresh and ``owner`` (``None``: anyone) may
        see it; else ``None`` (read the table). Look it up right after ``subscribe``."""
        found = self._recent.get(task_id)
        if found is None or self._clock() - found[-1][0] > RECENT_SECONDS:
            return None
        record = _record_of(found[-1][1])
        if record is None:  # too long to be notified whole: read it
            return None
        return record if owner is None or record.client_id == owner else None

    @contextlib.contextmanager
    def catching_up(self) -> Iterator[float]:
        """Keep every notified state while the block runs; yields the mark to pass to
        ``subscribe(..., since=mark)`` once the task's id is known (before the block ends)."""
        self._catching_up += 1
        try:
            yield self._clock()
        finally:
            self._catching_up -= 1

    def _remember(self, entries: list[Any] | None, now: float) -> None:
        """Keep a notification's entries (``None``: a pre-0006 payload, which carries no
        records: what it announced is unknown, to be read)."""
        if entries is None:
            self._dropped_at = now
            return
        for entry in entries:
            if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
                continue
            # An entry without the record (too long to be notified whole) is kept too: it says
            # the task changed, and whoever needs it reads the task.
            states = self._recent.get(entry["id"])
            if states is None:
                states = self._recent[entry["id"]] = deque()
            else:
                self._recent.move_to_end(entry["id"])
            if len(states) == HISTORY_PER_TASK:
                self._dropped_at = max(self._dropped_at, states.popleft()[0])
            states.append((now, entry))
        while len(self._recent) > RECENT_MAX:
            _, states = self._recent.popitem(last=False)
            self._dropped_at = max(self._dropped_at, states[-1][0])

    def _forget_all(self) -> None:
        self._recent.clear()
        self._dropped_at = self._clock()  # a catch-up open now has lost what it kept

    @contextlib.contextmanager
    def subscribe(self, task_id: str, *, since: float | None = None) -> Iterator[Subscription]:
        """Every change of the task from now on; with ``since`` (a ``catching_up()`` mark,
        that block still open), first the changes notified since the mark, in order."""
        self._watched_at = self._clock()
        sub = Subscription(task_id)
        if since is not None:
            self._replay(sub, since)
        self._subscribers.setdefault(task_id, set()).add(sub)
        try:
            yield sub
        finally:
            subs = self._subscribers.get(task_id)
            if subs is not None:
                subs.discard(sub)
                if not subs:
                    del self._subscribers[task_id]

    def _replay(self, sub: Subscription, since: float) -> None:
        if self._dropped_at >= since:
            sub.put(None)  # some state since the mark may be gone: read the task
            return
        # Kept entries are read as live ones are (``changes_of``): a malformed one is skipped.
        kept = [entry for at, entry in self._recent.get(sub.task_id, ()) if at >= since]
        for _, status, record in changes_of(kept):
            sub.put((status, record) if record is not None else None)

    async def _run(self) -> None:
        failures = 0
        connected_before = False
        while True:
            try:
                if not self._listener.connected:
                    self._forget_all()  # whatever was notified meanwhile is unknown
                    try:
                        await self._listener.connect()
                    finally:
                        self._first_attempt.set()
                    if connected_before:  # back after a drop: something may have been missed
                        self._side_channels_missed()
                    connected_before = True
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
            if notes:
                self._received(self._pass_on_side_channels(notes))

    def _pass_on_side_channels(self, notes: list[tuple[str, str]]) -> list[str]:
        """Hand each side channel's notifications to its handler; the status payloads."""
        if not self._side_channels:
            return [payload for _, payload in notes]
        payloads = []
        for channel, payload in notes:
            side = self._side_channels.get(channel)
            if side is None:
                payloads.append(payload)
                continue
            try:
                side.notified(payload)
            except Exception:  # one handler's bug must not stop the watches
                log.exception("side channel handler failed", extra={"channel": channel})
        return payloads

    def _side_channels_missed(self) -> None:
        for channel, side in self._side_channels.items():
            try:
                side.missed()
            except Exception:
                log.exception("side channel handler failed", extra={"channel": channel})

    def _received(self, payloads: list[str]) -> None:
        """Keep (while watches start) and deliver what arrived; each payload is decoded at
        most once, and not at all when it names no watched task and nothing is kept."""
        now = self._clock()
        keeping = self._catching_up > 0 or now - self._watched_at < WATCHED_LATELY_SECONDS
        changes: list[Change] = []
        for payload in payloads:
            concerns = bool(self._subscribers) and self._may_concern(payload)
            if not (keeping or concerns):
                continue
            if not payload.startswith("["):  # the pre-0006 form
                if keeping:
                    self._remember(None, now)
                if concerns:
                    changes += parse_status_payload(payload, self._subscribers)
                continue
            entries = _entries(payload)
            if keeping:
                self._remember(entries, now)
            if concerns:
                changes += changes_of(entries, self._subscribers)
        if self._subscribers and changes:
            self.deliver(changes)

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
        self._forget_all()
        for subs in self._subscribers.values():
            for sub in subs:
                sub.put(None)
