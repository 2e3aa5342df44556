"""Task values shared by the store, hashd's TaskService and workerd (no I/O here)."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from hashmesh.core.queue.retention import PruneRun


class TaskStatus(str, Enum):
    PENDING = "pending"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    DEAD_LETTER = "dead_letter"

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({TaskStatus.SUCCEEDED, TaskStatus.CANCELLED, TaskStatus.DEAD_LETTER})


def new_task_id(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits. Ids made close in
    time sort together, so the primary key grows at its right edge instead of touching a random
    page of a large index for every new task (and every status change of a recent one)."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    value = (ms & (2**48 - 1)) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC variant
    return str(uuid.UUID(int=value))


@dataclass(frozen=True)
class NewTask:
    """A validated submission."""

    algorithm: str
    data: bytes
    params: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_attempts: int = 5
    run_after: datetime | None = None
    client_id: str = "anonymous"
    idempotency_key: str | None = None
    cached_result: tuple[bytes, str] | None = None
    """(digest, encoded) found in the shared result cache: the task is stored SUCCEEDED at once
    and never enters the queue."""
    fingerprint: bytes | None = None
    """Keyed HMAC of the request (``hashmesh.core.queue.idempotency``), stored with a keyed
    task so that a reuse of its key with another request can be told apart."""


@dataclass(frozen=True)
class TaskRecord:
    """A task as stored; never holds the input."""

    id: str
    algorithm: str
    status: TaskStatus
    priority: int
    attempts: int
    max_attempts: int
    client_id: str
    idempotency_key: str | None
    input_size: int
    result_digest: bytes | None
    result_encoded: str | None
    cached: bool
    last_error: str | None
    created_at: datetime
    run_after: datetime
    started_at: datetime | None
    finished_at: datetime | None
    worker: str | None
    cancel_requested: bool

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> TaskRecord:
        return cls(
            id=str(row["id"]),
            algorithm=row["algorithm"],
            status=TaskStatus(row["status"]),
            priority=row["priority"],
            attempts=row["attempts"],
            max_attempts=row["max_attempts"],
            client_id=row["client_id"],
            idempotency_key=row["idempotency_key"],
            input_size=row["input_size"],
            result_digest=row["result_digest"],
            result_encoded=row["result_encoded"],
            cached=row["cached"],
            last_error=row["last_error"],
            created_at=row["created_at"],
            run_after=row["run_after"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            worker=row["worker"],
            cancel_requested=row["cancel_requested"],
        )


@dataclass(frozen=True)
class ClaimedTask:
    """A task a worker holds under ``lease_id``; carries the input for computation."""

    id: str
    algorithm: str
    data: bytes
    """The input as stored: sealed when ``input_key_id`` is set (``hashmesh.core.queue.sealing``)."""
    params: dict[str, Any]
    attempts: int
    max_attempts: int
    lease_id: int
    cancel_requested: bool = False
    input_key_id: str | None = None
    """Id of the key that sealed ``data``; ``None``: stored as given."""
    client_id: str = ""
    """Whose task it is: the tenant its result is cached for."""


@dataclass(frozen=True)
class Submitted:
    """One submission's answer: the task, and False when an earlier one had its idempotency key."""

    task: TaskRecord
    created: bool
    fingerprint: bytes | None = None
    """The stored request fingerprint of ``task`` (when ``created`` is False: the earlier
    request's, to compare with the repeat's)."""


@dataclass(frozen=True)
class Completion:
    """A computed result to write back under the worker's lease."""

    id: str
    lease_id: int
    digest: bytes
    encoded: str


@dataclass(frozen=True)
class Failure:
    """A failed attempt to record under the worker's lease; ``error`` never holds the input."""

    id: str
    lease_id: int
    error: str


@dataclass(frozen=True)
class Lease:
    """A task a worker holds: enough to renew, release or fence it."""

    id: str
    lease_id: int


@dataclass(frozen=True)
class Outcome:
    """What a worker-side write did to one task, as the database recorded it (for metrics)."""

    id: str
    algorithm: str
    status: TaskStatus
    latency_seconds: float | None
    """``finished_at - created_at`` once the task is final; ``None`` while it will be retried."""


@dataclass(frozen=True)
class ListCursor:
    """Where a page of ``ListTasks`` ends (newest first): the last row's (created_at, id)."""

    created_at: datetime
    id: str


@dataclass(frozen=True)
class ListFilter:
    client_id: str | None = None
    statuses: tuple[TaskStatus, ...] = ()
    algorithm: str | None = None


@dataclass(frozen=True)
class WorkerRecord:
    name: str
    host: str
    pid: int
    started_at: datetime
    last_heartbeat: datetime
    in_flight: int
    processed: int
    alive: bool


@dataclass(frozen=True)
class QueueStats:
    counts: dict[TaskStatus, int]
    oldest_pending_seconds: float
    completed_last_minute: int
    workers: list[WorkerRecord]

    @property
    def workers_alive(self) -> int:
        return sum(1 for w in self.workers if w.alive)


class Notifications(Protocol):
    """A LISTEN connection: ``Listener`` on PostgreSQL, ``MemoryListener`` in unit tests.
    ``wait`` returns the (channel, payload) pairs that arrived within a timeout and raises
    ``Unavailable`` once the connection is lost; ``session`` is the database session it holds
    (a worker's claims are stamped with it), ``None`` without one."""

    @property
    def connected(self) -> bool: ...
    @property
    def session(self) -> int | None: ...
    async def connect(self) -> None: ...
    async def wait(self, timeout: float) -> list[tuple[str, str]]: ...
    async def close(self) -> None: ...


class TaskStore(Protocol):
    """What hashd and workerd need from a task store: ``PostgresTaskStore`` in production,
    ``MemoryTaskStore`` in unit tests.

    ``owner`` scopes a caller's reads and transitions to its own tasks: a task of another
    client is NOT_FOUND, worded as for an id that does not exist. ``None`` (an operator) sees
    every task; so does ``ListFilter.client_id=None``. ``live_keys`` forgets the caller's keys
    older than the window (their tasks stay) and returns the others with their fingerprints."""

    async def submit_many(self, tasks: Sequence[NewTask]) -> list[Submitted]: ...
    async def live_keys(
        self, client_id: str, keys: Sequence[str], *, window_seconds: float
    ) -> dict[str, tuple[TaskRecord, bytes | None]]: ...
    async def get(self, task_id: str, *, owner: str | None) -> TaskRecord: ...
    async def get_many(self, task_ids: Sequence[str]) -> list[TaskRecord]: ...
    async def list_tasks(
        self, filters: ListFilter, *, limit: int, after: ListCursor | None
    ) -> list[TaskRecord]: ...
    async def stats(self, *, alive_seconds: float) -> QueueStats: ...
    async def count_by_status(self) -> dict[TaskStatus, int]: ...
    async def unfinished_by_client(self) -> dict[str, int]: ...
    async def prune(self, ages: Mapping[TaskStatus, float], *, batch: int) -> PruneRun | None: ...
    async def prune_preview(self, ages: Mapping[TaskStatus, float]) -> dict[TaskStatus, int]: ...
    async def unfinished_cost_by_client(self) -> dict[str, int]: ...
    async def cancel(self, task_id: str, *, owner: str | None) -> TaskRecord: ...
    async def requeue(self, task_id: str, *, owner: str | None) -> TaskRecord: ...
    async def claim(
        self, worker: str, limit: int, lease_seconds: float, *, session: int | None = None
    ) -> list[ClaimedTask]: ...
    async def next_due(self) -> float | None: ...
    async def complete_many(self, done: Sequence[Completion]) -> set[str]: ...
    async def complete_outcomes(self, done: Sequence[Completion]) -> list[Outcome]: ...
    async def fail_many(
        self, failed: Sequence[Failure], *, base: float, cap: float
    ) -> dict[str, TaskStatus]: ...
    async def fail_outcomes(
        self, failed: Sequence[Failure], *, base: float, cap: float
    ) -> list[Outcome]: ...
    async def release(self, leases: Sequence[Lease]) -> set[str]: ...
    async def acknowledge_cancel(self, leases: Sequence[Lease]) -> set[str]: ...
    async def heartbeat(
        self,
        worker: str,
        leases: Sequence[Lease],
        *,
        lease_seconds: float,
        in_flight: int,
        processed: int,
    ) -> dict[str, bool]: ...
    async def reclaim_lost(self) -> int: ...
    async def reclaim_lost_outcomes(self) -> list[Outcome]: ...
    async def set_worker_session(self, name: str, session: int) -> None: ...
    async def register_worker(
        self, name: str, host: str, pid: int, *, session: int | None = None
    ) -> None: ...
    async def unregister_worker(self, name: str, processed: int) -> None: ...
