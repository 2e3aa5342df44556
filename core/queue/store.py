"""The PostgreSQL task store: the only module that speaks SQL about tasks and workers.

The statements live in ``core/queue/sql/tasks.sql`` (named sections, loaded once). Every method is
one round trip unless it says otherwise; batches travel as arrays (``unnest``), never as a
loop of statements. Driver errors become ``Unavailable`` in ``hashmesh.core.queue.db.connection``."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any, cast

import psycopg
import psycopg_pool
from psycopg import sql

from hashmesh.core.errors import FailedPrecondition, Unavailable, task_not_found
from hashmesh.core.queue.coalesce import SubmitCoalescer, SubmitMany
from hashmesh.core.queue.db import connection, sync_errors, unavailable
from hashmesh.core.queue.model import (
    ClaimedTask,
    Completion,
    Failure,
    Lease,
    ListCursor,
    ListFilter,
    NewTask,
    Outcome,
    QueueStats,
    Submitted,
    TaskRecord,
    TaskStatus,
    TaskStore,
    WorkerRecord,
    new_task_id,
)
from hashmesh.core.queue.retention import PruneRun
from hashmesh.core.queue.sealing import TaskKeyring

COLUMNS = """id, algorithm, status, priority, attempts, max_attempts, client_id, idempotency_key,
    input_size, result_digest, result_encoded, cached, last_error, created_at, run_after,
    started_at, finished_at, worker, cancel_requested"""

NOTIFY_READY = "hashmesh_tasks_ready"
"""Channel workerd listens on: claimable work may have appeared."""
NOTIFY_STATUS = "hashmesh_task_status"
"""Channel hashd's watch hub listens on: payload ``id status,id status,...``."""
PRUNER_LOCK = (26734, 2)
"""Advisory lock (two-int form) a pruner run holds, so one process prunes at a time."""
MAX_SUBMIT_TASKS = 10_000
"""Tasks one shared submit statement carries at most (a larger call goes alone)."""
SESSION_SETTLE_SECONDS = 5.0
"""After the server starts, sessions are not judged for this long: workers reconnect first."""


def parse_sections(text: str) -> dict[str, str]:
    """``-- name: x`` sections of a SQL file, comments kept, ``{columns}`` filled in."""
    queries: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("-- name:"):
            current = queries.setdefault(line.split(":", 1)[1].strip(), [])
        elif current is not None:
            current.append(line)
    return {
        name: "\n".join(lines).strip().replace("{columns}", COLUMNS)
        for name, lines in queries.items()
    }


@cache
def queries() -> dict[str, str]:
    text = (resources.files("hashmesh.core.queue") / "sql" / "tasks.sql").read_text(
        encoding="utf-8"
    )
    return parse_sections(text)


def _q(name: str) -> str:
    return queries()[name]


class PostgresTaskStore:
    """Tasks and workers in PostgreSQL, through a caller-owned (opened) pool. With a
    ``keyring``, every input is sealed before it is sent (hashd); workerd opens them."""

    def __init__(
        self, pool: psycopg_pool.AsyncConnectionPool, keyring: TaskKeyring | None = None
    ) -> None:
        self._pool = pool
        self._keyring = keyring
        # Two statements in flight at most, and never the whole pool: a drain keeps its
        # connection while callers keep coming, and reads need connections too.
        self._coalescer = SubmitCoalescer(
            self._submit_session,
            max_tasks=MAX_SUBMIT_TASKS,
            max_in_flight=max(1, min(2, pool.max_size // 2)),
        )

    async def _rows(self, query: str, params: dict[str, Any], *, what: str) -> list[dict[str, Any]]:
        async with connection(self._pool, what=what) as conn:
            cur = await conn.execute(_q(query), params)
            # Not ``cur.description``: it builds a Column per field on every call, and the
            # row factory has built them once already.
            result = cur.pgresult
            return _rows(await cur.fetchall()) if result is not None and result.nfields else []

    # -- submissions -------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> Submitted:
        return (await self.submit_many([task]))[0]

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        """Store a batch (all or nothing), in order, answered once committed. A task whose
        (client_id, idempotency_key) exists already, or appears earlier in the batch, comes
        back as that task with ``created=False``. Concurrent calls share statements and
        commits (``SubmitCoalescer``, group commit); each call's tasks stay one unit."""
        if not tasks:
            return []
        return await self._coalescer.submit(tasks)

    @contextlib.asynccontextmanager
    async def _submit_session(self) -> AsyncIterator[SubmitMany]:
        """One pooled connection for a run of the coalescer's statements."""
        async with connection(self._pool, what="submitting tasks") as conn:

            async def submit_many(tasks: Sequence[NewTask]) -> list[Submitted]:
                return await self._insert(conn, tasks)

            yield submit_many

    async def _insert(
        self, conn: psycopg.AsyncConnection[Any], tasks: Sequence[NewTask]
    ) -> list[Submitted]:
        ids = [new_task_id() for _ in tasks]
        # One JSON parameter, not an array per column: psycopg dumps arrays element by element
        # in Python, json.dumps runs in C (bench: a quarter of hashd's CPU per statement).
        rows = [_submit_row(self._keyring, i, t) for i, t in zip(ids, tasks, strict=True)]
        try:
            cur = await conn.execute(_q("submit"), {"rows": json.dumps(rows)})
            stored = {str(r["id"]): r for r in _rows(await cur.fetchall())}
            missing = [t for i, t in zip(ids, tasks, strict=True) if i not in stored]
            existing = await self._existing_keys(conn, missing) if missing else {}
        except psycopg.OperationalError as exc:
            raise unavailable("submitting tasks", exc) from exc
        answers = []
        for task_id, task in zip(ids, tasks, strict=True):
            row = stored.get(task_id)
            if row is not None:
                answers.append(
                    Submitted(
                        _inserted(task_id, task, row), created=True, fingerprint=task.fingerprint
                    )
                )
            else:
                assert task.idempotency_key is not None, "only a keyed task can be skipped"
                record, fingerprint = existing[(task.client_id, task.idempotency_key)]
                answers.append(Submitted(record, created=False, fingerprint=fingerprint))
        return answers

    async def _existing_keys(
        self, conn: psycopg.AsyncConnection[Any], skipped: Sequence[NewTask]
    ) -> dict[tuple[str, str], tuple[TaskRecord, bytes | None]]:
        """The stored tasks (and fingerprints) that the keys of ``skipped`` belong to."""
        existing: dict[tuple[str, str], tuple[TaskRecord, bytes | None]] = {}
        for client_id in {t.client_id for t in skipped}:
            keys = sorted(
                {
                    t.idempotency_key
                    for t in skipped
                    if t.client_id == client_id and t.idempotency_key
                }
            )
            cur = await conn.execute(
                _q("by_idempotency_keys"), {"client_id": client_id, "keys": keys}
            )
            for row in _rows(await cur.fetchall()):
                existing[(client_id, row["idempotency_key"])] = (
                    TaskRecord.from_row(row),
                    row["idempotency_fingerprint"],
                )
        return existing

    async def live_keys(
        self, client_id: str, keys: Sequence[str], *, window_seconds: float
    ) -> dict[str, tuple[TaskRecord, bytes | None]]:
        rows = await self._rows(
            "live_keys",
            {"client_id": client_id, "keys": sorted(set(keys)), "window": window_seconds},
            what="reading idempotency keys",
        )
        return {
            r["idempotency_key"]: (TaskRecord.from_row(r), r["idempotency_fingerprint"])
            for r in rows
        }

    # -- reading -----------------------------------------------------------------------------

    async def get(self, task_id: str, *, owner: str | None) -> TaskRecord:
        rows = await self._rows("get", {"id": task_id, "owner": owner}, what="reading a task")
        if not rows:
            raise task_not_found(task_id)
        return TaskRecord.from_row(rows[0])

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        rows = await self._rows("get_many", {"ids": list(task_ids)}, what="reading tasks")
        return [TaskRecord.from_row(r) for r in rows]

    async def list_tasks(
        self, filters: ListFilter, *, limit: int, after: ListCursor | None
    ) -> list[TaskRecord]:
        rows = await self._rows(
            "list",
            {
                "client_id": filters.client_id,
                "statuses": [s.value for s in filters.statuses] or None,
                "algorithm": filters.algorithm,
                "after_created": after.created_at if after else None,
                "after_id": after.id if after else None,
                "limit": limit,
            },
            what="listing tasks",
        )
        return [TaskRecord.from_row(r) for r in rows]

    async def stats(self, *, alive_seconds: float) -> QueueStats:
        async with connection(self._pool, what="reading queue statistics") as conn:
            cur = await conn.execute(_q("count_by_status"))
            counts = {s: 0 for s in TaskStatus}
            for row in _rows(await cur.fetchall()):
                counts[TaskStatus(row["status"])] = int(row["n"])
            cur = await conn.execute(_q("queue_summary"))
            [summary] = _rows(await cur.fetchall())
            cur = await conn.execute(_q("workers"), {"alive_seconds": alive_seconds})
            workers = [WorkerRecord(**row) for row in _rows(await cur.fetchall())]
        return QueueStats(
            counts=counts,
            oldest_pending_seconds=max(0.0, float(summary["oldest_pending_seconds"] or 0.0)),
            completed_last_minute=int(summary["completed_last_minute"]),
            workers=workers,
        )

    async def count_by_status(self) -> dict[TaskStatus, int]:
        """Tasks by status (0 for a status with none); the queue-depth gauge reads it."""
        rows = await self._rows("count_by_status", {}, what="counting tasks by status")
        counts = {s: 0 for s in TaskStatus}
        for row in rows:
            counts[TaskStatus(row["status"])] = int(row["n"])
        return counts

    async def unfinished_by_client(self) -> dict[str, int]:
        rows = await self._rows("unfinished_by_client", {}, what="counting pending tasks")
        return {r["client_id"]: int(r["n"]) for r in rows}

    # -- retention ---------------------------------------------------------------------------

    async def prune(self, ages: Mapping[TaskStatus, float], *, batch: int) -> PruneRun | None:
        """Delete finished tasks older than their status's age, ``batch`` rows per statement,
        under the pruner's advisory lock; ``None`` when another process holds it. Also folds
        the counters' slots (the same lock keeps that to one process)."""
        started = time.monotonic()
        deleted: dict[TaskStatus, int] = {}
        batches = 0
        async with connection(self._pool, what="pruning finished tasks") as conn:
            cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", PRUNER_LOCK)
            if not _rows(await cur.fetchall())[0]["ok"]:
                return None
            try:
                for status, age in ages.items():
                    while True:
                        cur = await conn.execute(
                            _q("prune"),
                            {"status": status.value, "age_seconds": age, "batch": batch},
                        )
                        n = len(await cur.fetchall())
                        batches += 1
                        deleted[status] = deleted.get(status, 0) + n
                        if n < batch:
                            break
                for query in ("compact_task_counts", "compact_client_counts", "drop_zero_counters"):
                    await conn.execute(_q(query))
                await conn.execute("SELECT pg_advisory_unlock(%s, %s)", PRUNER_LOCK)
            except BaseException:
                # Interrupted (cancelled at shutdown, connection trouble): a pooled connection
                # must not keep the session lock, or no pruner would ever run again. Closed,
                # it leaves the pool and PostgreSQL releases the lock with it.
                await conn.close()
                raise
        return PruneRun(deleted=deleted, batches=batches, seconds=time.monotonic() - started)

    async def prune_preview(self, ages: Mapping[TaskStatus, float]) -> dict[TaskStatus, int]:
        """How many tasks of each status ``prune`` would delete now (nothing is deleted)."""
        due: dict[TaskStatus, int] = {}
        async with connection(self._pool, what="previewing retention") as conn:
            for status, age in ages.items():
                cur = await conn.execute(
                    _q("prune_preview"), {"status": status.value, "age_seconds": age}
                )
                due[status] = int(_rows(await cur.fetchall())[0]["n"])
        return due

    async def unfinished_cost_by_client(self) -> dict[str, int]:
        rows = await self._rows(
            "unfinished_cost_by_client", {}, what="summing the cost of pending tasks"
        )
        return {r["client_id"]: int(r["cost"]) for r in rows}

    # -- caller transitions ------------------------------------------------------------------

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        rows = await self._rows("cancel", {"id": task_id, "owner": owner}, what="cancelling a task")
        if rows:
            return TaskRecord.from_row(rows[0])
        current = await self.get(task_id, owner=owner)
        raise FailedPrecondition(
            f"task {task_id} is {current.status.value}; only unfinished tasks can be cancelled",
            reason="TASK_FINISHED",
            subject=f"tasks/{task_id}",
        )

    async def requeue(self, task_id: str, *, owner: str | None) -> TaskRecord:
        rows = await self._rows(
            "requeue", {"id": task_id, "owner": owner}, what="requeueing a task"
        )
        if rows:
            return TaskRecord.from_row(rows[0])
        current = await self.get(task_id, owner=owner)
        if current.status in (TaskStatus.DEAD_LETTER, TaskStatus.CANCELLED):
            raise FailedPrecondition(
                f"task {task_id} cannot be requeued: its input was erased when it ended (argon2 "
                "inputs are secrets); submit it again",
                reason="TASK_INPUT_ERASED",
                subject=f"tasks/{task_id}",
            )
        raise FailedPrecondition(
            f"task {task_id} is {current.status.value}; "
            "only DEAD_LETTER or CANCELLED tasks can be requeued",
            reason="TASK_NOT_REQUEUEABLE",
            subject=f"tasks/{task_id}",
        )

    # -- worker side -------------------------------------------------------------------------

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, *, session: int | None = None
    ) -> list[ClaimedTask]:
        """Claim up to ``limit`` due tasks; ``session`` (from ``Listener.session``) lets the
        reaper put them back the moment the worker's connection dies."""
        rows = await self._rows(
            "claim",
            {"worker": worker, "limit": limit, "lease_seconds": lease_seconds, "session": session},
            what="claiming tasks",
        )
        return [_claimed(row) for row in rows]

    async def next_due(self) -> float | None:
        """Seconds until the next waiting task is due; ``None`` when nothing waits."""
        rows = await self._rows("next_due", {}, what="looking for due tasks")
        wait = rows[0]["wait"] if rows else None
        return None if wait is None else float(wait)

    async def complete_many(self, done: Sequence[Completion]) -> set[str]:
        """Write results; returns the ids written (the others lost their lease: fenced)."""
        return {o.id for o in await self.complete_outcomes(done)}

    async def complete_outcomes(self, done: Sequence[Completion]) -> list[Outcome]:
        """``complete_many`` with each written task's new status (succeeded, or cancelled when
        asked meanwhile), algorithm and submit→final latency."""
        if not done:
            return []
        results = [
            {
                "id": d.id,
                "lease_id": d.lease_id,
                "digest": "\\x" + d.digest.hex(),
                "encoded": d.encoded,
            }
            for d in done
        ]
        rows = await self._rows("complete", {"rows": json.dumps(results)}, what="writing results")
        return [_outcome(r) for r in rows]

    async def complete(self, task_id: str, lease_id: int, digest: bytes, encoded: str) -> bool:
        """Record one result; only the current lease holder succeeds (fencing)."""
        return bool(await self.complete_many([Completion(task_id, lease_id, digest, encoded)]))

    async def fail_many(
        self, failed: Sequence[Failure], *, base: float, cap: float
    ) -> dict[str, TaskStatus]:
        """Record failed attempts; returns each recorded task's new status."""
        return {o.id: o.status for o in await self.fail_outcomes(failed, base=base, cap=cap)}

    async def fail_outcomes(
        self, failed: Sequence[Failure], *, base: float, cap: float
    ) -> list[Outcome]:
        """``fail_many`` with each recorded task's algorithm and, once final, latency."""
        if not failed:
            return []
        rows = await self._rows(
            "fail",
            {
                "id": [f.id for f in failed],
                "lease_id": [f.lease_id for f in failed],
                "error": [f.error for f in failed],
                "base": base,
                "cap": cap,
            },
            what="recording failures",
        )
        return [_outcome(r) for r in rows]

    async def release(self, leases: Sequence[Lease]) -> set[str]:
        """Hand back tasks that were claimed but never started."""
        return await self._lease_op("release", leases, what="handing back tasks")

    async def acknowledge_cancel(self, leases: Sequence[Lease]) -> set[str]:
        return await self._lease_op("acknowledge_cancel", leases, what="cancelling running tasks")

    async def _lease_op(self, query: str, leases: Sequence[Lease], *, what: str) -> set[str]:
        if not leases:
            return set()
        params = {"id": [x.id for x in leases], "lease_id": [x.lease_id for x in leases]}
        return {str(r["id"]) for r in await self._rows(query, params, what=what)}

    async def heartbeat(
        self,
        worker: str,
        leases: Sequence[Lease],
        *,
        lease_seconds: float,
        in_flight: int,
        processed: int,
    ) -> dict[str, bool]:
        """Renew ``leases`` and the worker's liveness; returns {task id: cancel requested} for
        the leases still held."""
        rows = await self._rows(
            "heartbeat",
            {
                "worker": worker,
                "id": [x.id for x in leases],
                "lease_id": [x.lease_id for x in leases],
                "lease_seconds": lease_seconds,
                "in_flight": in_flight,
                "processed": processed,
            },
            what="renewing leases",
        )
        return {str(r["id"]): bool(r["cancel_requested"]) for r in rows}

    async def reclaim_lost(self) -> int:
        """Put back tasks whose worker's session is gone or whose lease expired; returns how
        many (0 while another process is doing it)."""
        return len(await self.reclaim_lost_outcomes())

    async def reclaim_lost_outcomes(self) -> list[Outcome]:
        """``reclaim_lost`` with each task's new status (retrying, dead_letter, cancelled)."""
        rows = await self._rows(
            "reclaim_lost",
            {"settle_seconds": SESSION_SETTLE_SECONDS},
            what="reclaiming tasks of lost workers",
        )
        return [_outcome(r) for r in rows]

    async def register_worker(
        self, name: str, host: str, pid: int, *, session: int | None = None
    ) -> None:
        await self._rows(
            "register_worker",
            {"name": name, "host": host, "pid": pid, "session": session},
            what="registering",
        )

    async def set_worker_session(self, name: str, session: int) -> None:
        """Record the session of a reopened LISTEN connection (shown as liveness)."""
        await self._rows(
            "worker_session", {"name": name, "session": session}, what="recording a session"
        )

    async def unregister_worker(self, name: str, processed: int) -> None:
        await self._rows(
            "unregister_worker", {"name": name, "processed": processed}, what="unregistering"
        )


def _rows(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The pool's rows are dicts (``dict_row``); typed loosely for the driver's sake."""
    return cast(list[dict[str, Any]], rows)


def _outcome(row: dict[str, Any]) -> Outcome:
    latency = row["latency_seconds"]
    return Outcome(
        id=str(row["id"]),
        algorithm=row["algorithm"],
        status=TaskStatus(row["status"]),
        latency_seconds=None if latency is None else float(latency),
    )


def _stored_input(
    keyring: TaskKeyring | None, task_id: str, task: NewTask
) -> tuple[bytes | None, str | None]:
    """(input column, key id): sealed when a keyring is configured; nothing for a cache hit.
    hashd refuses argon2 tasks without a keyring, and a CHECK constraint backs that up."""
    if task.cached_result:
        return None, None
    if keyring is None:
        return task.data, None
    sealed = keyring.seal(task_id, task.algorithm, task.params, task.data)
    return sealed.blob, sealed.key_id


def _submit_row(keyring: TaskKeyring | None, task_id: str, task: NewTask) -> dict[str, Any]:
    """One element of the ``submit`` statement's JSON (bytea as ``\\x`` hex, keys left out
    are NULL)."""
    blob, key_id = _stored_input(keyring, task_id, task)
    row: dict[str, Any] = {
        "id": task_id,
        "algorithm": task.algorithm,
        "input_size": len(task.data),
        "params": task.params,
        "priority": task.priority,
        "max_attempts": task.max_attempts,
        "client_id": task.client_id,
    }
    if blob is not None:
        row["input"] = "\\x" + blob.hex()
    if key_id is not None:
        row["input_key_id"] = key_id
    if task.run_after is not None:
        row["run_after"] = task.run_after.isoformat()
    if task.idempotency_key:
        row["idempotency_key"] = task.idempotency_key
        if task.fingerprint is not None:
            row["fingerprint"] = "\\x" + task.fingerprint.hex()
    if task.cached_result:
        row["status"] = "succeeded"
        row["result_digest"] = "\\x" + task.cached_result[0].hex()
        row["result_encoded"] = task.cached_result[1]
    return row


def _inserted(task_id: str, task: NewTask, row: dict[str, Any]) -> TaskRecord:
    """The record of a task just inserted: what was sent, plus what the database chose."""
    cached = task.cached_result is not None
    return TaskRecord(
        id=task_id,
        algorithm=task.algorithm,
        status=TaskStatus.SUCCEEDED if cached else TaskStatus.PENDING,
        priority=task.priority,
        attempts=0,
        max_attempts=task.max_attempts,
        client_id=task.client_id,
        idempotency_key=task.idempotency_key,
        input_size=len(task.data),
        result_digest=task.cached_result[0] if task.cached_result else None,
        result_encoded=task.cached_result[1] if task.cached_result else None,
        cached=cached,
        last_error=None,
        created_at=row["created_at"],
        run_after=row["run_after"],
        started_at=None,
        finished_at=row["finished_at"],
        worker=None,
        cancel_requested=False,
    )


def _claimed(row: dict[str, Any]) -> ClaimedTask:
    return ClaimedTask(
        id=str(row["id"]),
        algorithm=row["algorithm"],
        data=bytes(row["input"] or b""),
        params=dict(row["params"] or {}),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        lease_id=row["lease_id"],
        cancel_requested=row["cancel_requested"],
        input_key_id=row["input_key_id"],
        client_id=row["client_id"],
    )


# The server probes an idle session connection after 5 s, then every 2 s, and drops it after
# 3 unanswered probes or 10 s of unacknowledged data: a lost host's session ends in ~11 s.
SESSION_KEEPALIVE = (
    "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=3"
    " -c tcp_user_timeout=10000"
)


class Listener:
    """One dedicated LISTEN connection (outside the pool). ``wait()`` returns the notifications
    that arrive within a timeout; a lost connection raises ``Unavailable`` and the owner calls
    ``connect()`` again (with its own backoff).

    With ``hold_session``, each connection also opens a worker session (``open_session``): a
    fresh id under a session-level advisory lock that lives exactly as long as the connection,
    so the reaper sees the worker's death as soon as PostgreSQL does."""

    def __init__(
        self,
        dsn: str,
        channels: Sequence[str],
        *,
        name: str,
        connect_timeout: float = 5.0,
        hold_session: bool = False,
    ) -> None:
        self._dsn = dsn
        self._channels = tuple(channels)
        self._name = name
        self._connect_timeout = connect_timeout
        self._hold_session = hold_session
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self.session: int | None = None
        """The session of the current connection (``hold_session`` only)."""

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.closed

    async def connect(self) -> None:
        await self.close()
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn,
                autocommit=True,
                application_name=self._name,
                connect_timeout=max(1, int(self._connect_timeout)),
                options=SESSION_KEEPALIVE if self._hold_session else "",
            )
            for channel in self._channels:
                await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
            session = None
            if self._hold_session:
                cur = await conn.execute(_q("open_session"))
                row = await cur.fetchone()
                assert row is not None, "open_session returns one row"
                session = int(row[0])
        except psycopg.Error as exc:
            raise Unavailable(
                f"cannot LISTEN: {type(exc).__name__}",
                retry_after=1.0,
                reason="DATABASE_UNAVAILABLE",
            ) from exc
        self._conn = conn
        self.session = session

    async def wait(self, timeout: float) -> list[tuple[str, str]]:
        """(channel, payload) pairs received within ``timeout`` seconds (maybe none)."""
        if self._conn is None:
            raise Unavailable(
                "LISTEN connection not open", retry_after=1.0, reason="DATABASE_UNAVAILABLE"
            )
        received = []
        try:
            async for note in self._conn.notifies(timeout=timeout, stop_after=1):
                received.append((note.channel, note.payload))
        except psycopg.Error as exc:
            await self.close()
            raise Unavailable(
                f"LISTEN connection lost: {type(exc).__name__}",
                retry_after=1.0,
                reason="DATABASE_UNAVAILABLE",
            ) from exc
        return received

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        self.session = None
        if conn is not None:
            with contextlib.suppress(psycopg.Error):
                await conn.close()


def input_key_usage(dsn: str) -> list[tuple[str, int, int]]:
    """(key id, unfinished, finished) rows still holding an input sealed with each key: the
    check of a key rotation (``hashctl keys usage``). One short connection of its own."""
    with sync_errors("reading key usage"), psycopg.connect(dsn, connect_timeout=10) as conn:
        rows = conn.execute(_q("input_key_usage")).fetchall()
    return [(str(key_id), int(unfinished), int(finished)) for key_id, unfinished, finished in rows]


def _conforms(store: PostgresTaskStore) -> TaskStore:
    return store  # mypy checks that the two stores share one interface
