"""An in-memory task store with the PostgreSQL store's interface and rules, for fast unit
tests of the code around the store (integration tests still use PostgreSQL).

Same semantics, same names: idempotency per (client, key), claims by priority then due time,
leases with fencing, retries with equal-jitter backoff, DEAD_LETTER, cancellation, hand-back,
argon2 input erased on every final state. Time comes from an injectable clock."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from hashmesh.core.errors import FailedPrecondition, Unavailable, task_not_found
from hashmesh.core.queue.limits import task_cost
from hashmesh.core.queue.model import (
    FINAL_STATES,
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
from hashmesh.core.queue.store import NOTIFY_READY

WAITING = (TaskStatus.PENDING, TaskStatus.RETRYING)


@dataclass
class _Row:
    record: TaskRecord
    input: bytes | None
    params: dict[str, Any]
    lease_id: int | None = None
    lease_expires_at: datetime | None = None
    session: int | None = None
    completions: int = 0
    failures: list[dict[str, Any]] = field(default_factory=list)


def _now_utc() -> datetime:
    return datetime.fromtimestamp(time.time(), UTC)


class MemoryTaskStore:
    def __init__(self, clock: Callable[[], datetime] = _now_utc) -> None:
        self._clock = clock
        self._rows: dict[str, _Row] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._fingerprints: dict[str, bytes | None] = {}
        self._lease_seq = 0
        self._workers: dict[str, dict[str, Any]] = {}
        self._sessions = 0
        self._live_sessions: set[int] = set()
        self._listeners: set[MemoryListener] = set()

    def open_session(self) -> int:
        """A worker session, live until ``end_session`` (PostgreSQL: the LISTEN connection's
        advisory lock)."""
        self._sessions += 1
        self._live_sessions.add(self._sessions)
        return self._sessions

    def end_session(self, session: int) -> None:
        """The session's connection is gone: its tasks are lost at the next ``reclaim_lost``."""
        self._live_sessions.discard(session)

    def completions(self, task_id: str) -> int:
        return self._rows[task_id].completions

    def failures(self, task_id: str) -> list[dict[str, Any]]:
        return list(self._rows[task_id].failures)

    def _set(self, row: _Row, **changes: Any) -> None:
        row.record = replace(row.record, **changes)
        if row.record.status in FINAL_STATES and row.record.algorithm == "argon2id":
            row.input = None

    # -- submissions and reads ---------------------------------------------------------------

    async def submit(self, task: NewTask) -> Submitted:
        return (await self.submit_many([task]))[0]

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]:
        now = self._clock()
        answers = []
        for task in tasks:
            key = (task.client_id, task.idempotency_key) if task.idempotency_key else None
            if key is not None and key in self._keys:
                earlier = self._keys[key]
                answers.append(
                    Submitted(
                        self._rows[earlier].record,
                        created=False,
                        fingerprint=self._fingerprints.get(earlier),
                    )
                )
                continue
            cached = task.cached_result
            record = TaskRecord(
                id=new_task_id(), algorithm=task.algorithm,
                status=TaskStatus.SUCCEEDED if cached else TaskStatus.PENDING,
                priority=task.priority, attempts=0, max_attempts=task.max_attempts,
                client_id=task.client_id, idempotency_key=task.idempotency_key,
                input_size=len(task.data), result_digest=cached[0] if cached else None,
                result_encoded=cached[1] if cached else None, cached=cached is not None,
                last_error=None, created_at=now, run_after=task.run_after or now, started_at=None,
                finished_at=now if cached else None, worker=None, cancel_requested=False,
            )  # fmt: skip
            self._rows[record.id] = _Row(record, None if cached else task.data, dict(task.params))
            if key is not None:
                self._keys[key] = record.id
                self._fingerprints[record.id] = task.fingerprint
            answers.append(Submitted(record, created=True, fingerprint=task.fingerprint))
        self._announce()  # as the submit statement's NOTIFY
        return answers

    async def live_keys(
        self, client_id: str, keys: Sequence[str], *, window_seconds: float
    ) -> dict[str, tuple[TaskRecord, bytes | None]]:
        oldest = self._clock() - timedelta(seconds=window_seconds)
        live = {}
        for key in set(keys):
            task_id = self._keys.get((client_id, key))
            if task_id is None:
                continue
            row = self._rows[task_id]
            if row.record.created_at < oldest:  # forgotten; the task stays, keyless
                del self._keys[(client_id, key)]
                self._fingerprints.pop(task_id, None)
                row.record = replace(row.record, idempotency_key=None)
                continue
            live[key] = (row.record, self._fingerprints.get(task_id))
        return live

    def _owned(self, task_id: str, owner: str | None) -> _Row:
        """The row, when ``owner`` may see it; another client's task reads as missing."""
        row = self._rows.get(task_id)
        if row is None or (owner is not None and row.record.client_id != owner):
            raise task_not_found(task_id)
        return row

    async def get(self, task_id: str, *, owner: str | None) -> TaskRecord:
        return self._owned(task_id, owner).record

    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]:
        return [self._rows[i].record for i in task_ids if i in self._rows]

    async def list_tasks(
        self, filters: ListFilter, *, limit: int, after: ListCursor | None
    ) -> list[TaskRecord]:
        records = sorted(
            (r.record for r in self._rows.values()),
            key=lambda r: (r.created_at, r.id),
            reverse=True,
        )
        found = []
        for record in records:
            if filters.client_id is not None and record.client_id != filters.client_id:
                continue
            if filters.statuses and record.status not in filters.statuses:
                continue
            if filters.algorithm is not None and record.algorithm != filters.algorithm:
                continue
            if after is not None and (record.created_at, record.id) >= (after.created_at, after.id):
                continue
            found.append(record)
        return found[:limit]

    async def stats(self, *, alive_seconds: float) -> QueueStats:
        now = self._clock()
        counts = {s: 0 for s in TaskStatus}
        for row in self._rows.values():
            counts[row.record.status] += 1
        due = [r.record.run_after for r in self._rows.values()
               if r.record.status in WAITING and r.record.run_after <= now]  # fmt: skip
        recent = sum(
            1 for r in self._rows.values()
            if r.record.status in (TaskStatus.SUCCEEDED, TaskStatus.DEAD_LETTER)
            and r.record.finished_at is not None and r.record.finished_at > now - timedelta(seconds=60)
        )  # fmt: skip
        workers = [
            WorkerRecord(alive=w["stopped_at"] is None
                         and w["last_heartbeat"] > now - timedelta(seconds=alive_seconds),
                         **{k: v for k, v in w.items() if k != "stopped_at"})
            for w in self._workers.values()
        ]  # fmt: skip
        workers.sort(key=lambda w: (not w.alive, w.name))
        oldest = (now - min(due)).total_seconds() if due else 0.0
        return QueueStats(counts, oldest, recent, workers)

    async def count_by_status(self) -> dict[TaskStatus, int]:
        counts = {s: 0 for s in TaskStatus}
        for row in self._rows.values():
            counts[row.record.status] += 1
        return counts

    async def unfinished_by_client(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self._rows.values():
            if row.record.status not in FINAL_STATES:
                counts[row.record.client_id] = counts.get(row.record.client_id, 0) + 1
        return counts

    async def prune(self, ages: Mapping[TaskStatus, float], *, batch: int) -> PruneRun | None:
        due = self._due_for_pruning(ages)
        for row in due:
            del self._rows[row.record.id]
            if row.record.idempotency_key is not None:
                self._keys.pop((row.record.client_id, row.record.idempotency_key), None)
        deleted = {status: sum(1 for r in due if r.record.status is status) for status in ages}
        return PruneRun(deleted=deleted, batches=len(due) // batch + len(ages))

    async def prune_preview(self, ages: Mapping[TaskStatus, float]) -> dict[TaskStatus, int]:
        due = self._due_for_pruning(ages)
        return {status: sum(1 for r in due if r.record.status is status) for status in ages}

    def _due_for_pruning(self, ages: Mapping[TaskStatus, float]) -> list[_Row]:
        now = self._clock()
        return [
            row
            for row in self._rows.values()
            if row.record.status in ages
            and row.record.finished_at is not None
            and row.record.finished_at < now - timedelta(seconds=ages[row.record.status])
        ]

    async def unfinished_cost_by_client(self) -> dict[str, int]:
        costs: dict[str, int] = {}
        for row in self._rows.values():
            if row.record.status not in FINAL_STATES:
                cost = task_cost(row.record.algorithm, row.params, row.record.input_size)
                costs[row.record.client_id] = costs.get(row.record.client_id, 0) + cost
        return costs

    # -- caller transitions ------------------------------------------------------------------

    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord:
        row = self._owned(task_id, owner)
        if row.record.status in WAITING:
            self._set(row, status=TaskStatus.CANCELLED, finished_at=self._clock())
        elif row.record.status is TaskStatus.RUNNING:
            self._set(row, cancel_requested=True)
        else:
            raise FailedPrecondition(
                f"task {task_id} is {row.record.status.value}; only unfinished tasks can be cancelled",
                reason="TASK_FINISHED",
                subject=f"tasks/{task_id}",
            )
        return row.record

    async def requeue(self, task_id: str, *, owner: str | None) -> TaskRecord:
        row = self._owned(task_id, owner)
        if (
            row.record.status not in (TaskStatus.DEAD_LETTER, TaskStatus.CANCELLED)
            or row.input is None
        ):
            reason = "TASK_NOT_REQUEUEABLE" if row.input is not None else "TASK_INPUT_ERASED"
            raise FailedPrecondition(
                f"task {task_id} cannot be requeued", reason=reason, subject=f"tasks/{task_id}"
            )
        self._set(row, status=TaskStatus.PENDING, attempts=0, run_after=self._clock(), finished_at=None,
                  started_at=None, cancel_requested=False, worker=None, last_error=None)  # fmt: skip
        return row.record

    # -- worker side -------------------------------------------------------------------------

    async def claim(
        self, worker: str, limit: int, lease_seconds: float, *, session: int | None = None
    ) -> list[ClaimedTask]:
        now = self._clock()
        due = [
            r
            for r in self._rows.values()
            if r.record.status in WAITING and r.record.run_after <= now
        ]
        due.sort(key=lambda r: (-r.record.priority, r.record.run_after, r.record.id))
        claimed = []
        for row in due[:limit]:
            self._lease_seq += 1
            row.lease_id = self._lease_seq
            row.lease_expires_at = now + timedelta(seconds=lease_seconds)
            row.session = session
            self._set(
                row,
                status=TaskStatus.RUNNING,
                attempts=row.record.attempts + 1,
                worker=worker,
                started_at=now,
            )
            claimed.append(ClaimedTask(
                id=row.record.id, algorithm=row.record.algorithm, data=row.input or b"", params=dict(row.params),
                attempts=row.record.attempts, max_attempts=row.record.max_attempts, lease_id=row.lease_id,
                cancel_requested=row.record.cancel_requested, client_id=row.record.client_id,
            ))  # fmt: skip
        return claimed

    async def next_due(self) -> float | None:
        waiting = [r.record.run_after for r in self._rows.values() if r.record.status in WAITING]
        return (min(waiting) - self._clock()).total_seconds() if waiting else None

    def _held(self, task_id: str, lease_id: int) -> _Row | None:
        row = self._rows.get(task_id)
        if row is None or row.lease_id != lease_id or row.record.status is not TaskStatus.RUNNING:
            return None
        return row

    def _end_lease(self, row: _Row) -> None:
        row.lease_id = None
        row.lease_expires_at = None
        row.session = None

    async def complete_many(self, done: Sequence[Completion]) -> set[str]:
        written = set()
        for item in done:
            row = self._held(item.id, item.lease_id)
            if row is None:
                continue
            self._end_lease(row)
            if row.record.cancel_requested:
                self._set(row, status=TaskStatus.CANCELLED, finished_at=self._clock())
            else:
                row.completions += 1
                self._set(row, status=TaskStatus.SUCCEEDED, result_digest=item.digest,
                          result_encoded=item.encoded, finished_at=self._clock())  # fmt: skip
            written.add(item.id)
        return written

    async def complete(self, task_id: str, lease_id: int, digest: bytes, encoded: str) -> bool:
        return bool(await self.complete_many([Completion(task_id, lease_id, digest, encoded)]))

    async def fail_many(
        self, failed: Sequence[Failure], *, base: float, cap: float
    ) -> dict[str, TaskStatus]:
        now = self._clock()
        recorded = {}
        for item in failed:
            row = self._held(item.id, item.lease_id)
            if row is None:
                continue
            record = row.record
            retry_at = None
            if record.cancel_requested:
                status = TaskStatus.CANCELLED
            elif record.attempts >= record.max_attempts:
                status = TaskStatus.DEAD_LETTER
            else:
                status = TaskStatus.RETRYING
                delay = min(cap, base * 2 ** max(record.attempts - 1, 0)) * random.uniform(0.5, 1.0)
                retry_at = now + timedelta(seconds=delay)
            row.failures.append({"attempt": record.attempts, "worker": record.worker, "started_at": record.started_at,
                                 "failed_at": now, "error": item.error, "retry_at": retry_at})  # fmt: skip
            self._end_lease(row)
            self._set(row, status=status, last_error=item.error, run_after=retry_at or record.run_after,
                      finished_at=None if retry_at else now)  # fmt: skip
            recorded[item.id] = status
        return recorded

    async def release(self, leases: Sequence[Lease]) -> set[str]:
        released = set()
        for lease in leases:
            row = self._held(lease.id, lease.lease_id)
            if row is None:
                continue
            self._end_lease(row)
            cancelled = row.record.cancel_requested
            self._set(row, status=TaskStatus.CANCELLED if cancelled else TaskStatus.PENDING,
                      finished_at=self._clock() if cancelled else None,
                      attempts=max(row.record.attempts - 1, 0), worker=None, started_at=None)  # fmt: skip
            released.add(lease.id)
        return released

    async def acknowledge_cancel(self, leases: Sequence[Lease]) -> set[str]:
        done = set()
        for lease in leases:
            row = self._held(lease.id, lease.lease_id)
            if row is not None and row.record.cancel_requested:
                self._end_lease(row)
                self._set(row, status=TaskStatus.CANCELLED, finished_at=self._clock())
                done.add(lease.id)
        return done

    async def heartbeat(
        self,
        worker: str,
        leases: Sequence[Lease],
        *,
        lease_seconds: float,
        in_flight: int,
        processed: int,
    ) -> dict[str, bool]:
        now = self._clock()
        renewed = {}
        for lease in leases:
            row = self._held(lease.id, lease.lease_id)
            if row is not None:
                row.lease_expires_at = now + timedelta(seconds=lease_seconds)
                renewed[lease.id] = row.record.cancel_requested
        if worker in self._workers:
            self._workers[worker].update(
                last_heartbeat=now, in_flight=in_flight, processed=processed
            )
        return renewed

    async def reclaim_lost(self) -> int:
        now = self._clock()
        count = 0
        for row in self._rows.values():
            if row.record.status is not TaskStatus.RUNNING or row.lease_expires_at is None:
                continue
            expired = row.lease_expires_at < now
            if not expired and (row.session is None or row.session in self._live_sessions):
                continue
            record = row.record
            final = record.cancel_requested or record.attempts >= record.max_attempts
            status = (TaskStatus.CANCELLED if record.cancel_requested
                      else TaskStatus.DEAD_LETTER if final else TaskStatus.RETRYING)  # fmt: skip
            error = "lease expired" if expired else "worker lost"
            row.failures.append({"attempt": record.attempts, "worker": record.worker, "started_at": record.started_at,
                                 "failed_at": now, "error": error, "retry_at": now})  # fmt: skip
            self._end_lease(row)
            last_error = (f"lease expired: worker {record.worker} stopped renewing it" if expired
                          else f"worker lost: {record.worker} lost its database session (process or host gone)")  # fmt: skip
            self._set(row, status=status, run_after=now, finished_at=now if final else None,
                      last_error=last_error)  # fmt: skip
            count += 1
        return count

    async def register_worker(
        self, name: str, host: str, pid: int, *, session: int | None = None
    ) -> None:
        now = self._clock()
        self._workers[name] = {"name": name, "host": host, "pid": pid, "started_at": now, "last_heartbeat": now,
                               "in_flight": 0, "processed": 0, "stopped_at": None}  # fmt: skip

    async def unregister_worker(self, name: str, processed: int) -> None:
        if name in self._workers:
            self._workers[name].update(stopped_at=self._clock(), in_flight=0, processed=processed)

    # -- what the worker writes, with the outcome it had (for metrics) ----------------------

    def _outcome(self, row: _Row) -> Outcome:
        record = row.record
        finished = record.finished_at if record.status in FINAL_STATES else None
        latency = None if finished is None else (finished - record.created_at).total_seconds()
        return Outcome(record.id, record.algorithm, record.status, latency)

    async def complete_outcomes(self, done: Sequence[Completion]) -> list[Outcome]:
        written = await self.complete_many(done)
        return [self._outcome(self._rows[d.id]) for d in done if d.id in written]

    async def fail_outcomes(
        self, failed: Sequence[Failure], *, base: float, cap: float
    ) -> list[Outcome]:
        recorded = await self.fail_many(failed, base=base, cap=cap)
        return [self._outcome(self._rows[task_id]) for task_id in recorded]

    async def reclaim_lost_outcomes(self) -> list[Outcome]:
        held = {i for i, r in self._rows.items() if r.record.status is TaskStatus.RUNNING}
        await self.reclaim_lost()
        return [self._outcome(self._rows[i]) for i in sorted(held)
                if self._rows[i].record.status is not TaskStatus.RUNNING]  # fmt: skip

    async def set_worker_session(self, name: str, session: int) -> None:
        if name in self._workers:
            self._workers[name]["session"] = session

    def lease_expiries(self) -> dict[str, datetime]:
        """When each running task's lease ends (for tests of renewals)."""
        return {i: r.lease_expires_at for i, r in self._rows.items()
                if r.record.status is TaskStatus.RUNNING and r.lease_expires_at is not None}  # fmt: skip

    def _announce(self, payload: str = "") -> None:
        for listener in list(self._listeners):
            listener.notify(NOTIFY_READY, payload)


def _conforms(store: MemoryTaskStore) -> TaskStore:
    return store  # mypy checks that the two stores share one interface


class MemoryListener:
    """The in-memory store's LISTEN connection: ``connect`` opens a session of the store (as
    the PostgreSQL listener holds the worker's session lock), ``wait`` returns what the store
    announced (a submission: ``(NOTIFY_READY, "")``). ``drop()`` plays a lost connection."""

    def __init__(self, store: MemoryTaskStore) -> None:
        self._store = store
        self.session: int | None = None
        self._notes: list[tuple[str, str]] = []
        self._arrived = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.session is not None

    async def connect(self) -> None:
        await self.close()
        self.session = self._store.open_session()
        self._store._listeners.add(self)

    def notify(self, channel: str, payload: str) -> None:
        self._notes.append((channel, payload))
        self._arrived.set()

    async def wait(self, timeout: float) -> list[tuple[str, str]]:
        if self.session is None:
            raise Unavailable("LISTEN connection not open", retry_after=1.0,
                              reason="DATABASE_UNAVAILABLE")  # fmt: skip
        if not self._notes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), timeout)
        self._arrived.clear()
        notes, self._notes = self._notes, []
        return notes

    def drop(self) -> None:
        """The connection is gone (the worker's session with it); ``connect`` opens another."""
        if self.session is not None:
            self._store.end_session(self.session)
        self.session = None
        self._store._listeners.discard(self)

    async def close(self) -> None:
        self.drop()
