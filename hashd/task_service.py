"""TaskService: durable tasks in PostgreSQL, run by workerd.

Validation and wire conversion live here; every statement is in the store; waiting for
changes goes through the hub (one LISTEN connection per process)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import secrets
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta

from google.protobuf import timestamp_pb2

from hashmesh.core import metrics
from hashmesh.core.errors import (
    FailedPrecondition,
    InputTooLarge,
    InvalidArgument,
    Unavailable,
    Violations,
)
from hashmesh.core.handlers import Context
from hashmesh.core.hashing.algorithms import Algorithm, Argon2Params
from hashmesh.core.hashing.cache import ResultCache
from hashmesh.core.hashing.wire import algorithm_from_wire, algorithm_to_wire, argon2_params
from hashmesh.core.queue.idempotency import IdempotencyGuard
from hashmesh.core.queue.limits import PendingLimits, PriorityCaps, task_cost
from hashmesh.core.queue.model import (
    ListCursor,
    ListFilter,
    NewTask,
    QueueStats,
    TaskRecord,
    TaskStatus,
    TaskStore,
)
from hashmesh.hashd.config import HashdSettings
from hashmesh.hashd.identity import client_of, current_caller, list_scope
from hashmesh.hashd.watch import Subscription, WatchHub
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

MAX_BATCH = 10_000
MAX_KEY_LENGTH = 200
MAX_RUN_AFTER = timedelta(days=366)
MAX_CLIENT_ID_LENGTH = 200
MAX_PAGE_TOKEN_LENGTH = 512
"""Tokens this service issues are about 120 characters; a longer one is not ours."""
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
"""A larger ListTasks page_size is read as this (AIP-158), not refused."""
WATCH_POLL_SECONDS = 5.0
"""Watchers re-read their task at least this often, in case a notification was lost."""

STATUS_TO_WIRE: dict[TaskStatus, task_pb2.TaskStatus.ValueType] = {
    TaskStatus.PENDING: task_pb2.TASK_STATUS_PENDING,
    TaskStatus.RUNNING: task_pb2.TASK_STATUS_RUNNING,
    TaskStatus.RETRYING: task_pb2.TASK_STATUS_RETRYING,
    TaskStatus.SUCCEEDED: task_pb2.TASK_STATUS_SUCCEEDED,
    TaskStatus.CANCELLED: task_pb2.TASK_STATUS_CANCELLED,
    TaskStatus.DEAD_LETTER: task_pb2.TASK_STATUS_DEAD_LETTER,
}
STATUS_FROM_WIRE = {v: k for k, v in STATUS_TO_WIRE.items()}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_NAIVE_EPOCH = _EPOCH.replace(tzinfo=None)  # a naive datetime is UTC, as for FromDatetime


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    # Exact integer arithmetic, as Timestamp.FromDatetime, at half its cost (it goes through
    # utctimetuple and calendar.timegm): a watched task's messages carry up to 4 times each.
    since = value - (_EPOCH if value.tzinfo is not None else _NAIVE_EPOCH)
    return timestamp_pb2.Timestamp(
        seconds=since.days * 86400 + since.seconds, nanos=since.microseconds * 1000
    )


def task_to_wire(record: TaskRecord) -> task_pb2.Task:
    algorithm = algorithm_to_wire(Algorithm(record.algorithm))
    task = task_pb2.Task(
        id=record.id,
        algorithm=algorithm,
        status=STATUS_TO_WIRE[record.status],
        priority=record.priority,
        attempts=record.attempts,
        max_attempts=record.max_attempts,
        client_id=record.client_id,
        idempotency_key=record.idempotency_key or "",
        last_error=record.last_error or "",
        input_size=record.input_size,
        worker=record.worker or "",
        cancel_requested=record.cancel_requested,
        created_at=_timestamp(record.created_at),
        run_after=_timestamp(record.run_after),
        started_at=_timestamp(record.started_at),
        finished_at=_timestamp(record.finished_at),
    )
    if record.status is TaskStatus.SUCCEEDED and record.result_encoded is not None:
        task.result.CopyFrom(
            common_pb2.HashResult(
                algorithm=algorithm,
                digest=record.result_digest or b"",
                encoded=record.result_encoded,
                cached=record.cached,
            )
        )
    return task


def text_field(value: str, field: str, max_length: int) -> str:
    """``value`` if PostgreSQL can store it as text: bounded, and without NUL characters."""
    if len(value) > max_length:
        raise InvalidArgument(field, f"must be at most {max_length} characters")
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters")
    return value


def task_id_of(value: str, field: str = "id") -> str:
    if not value:
        raise InvalidArgument(field, "is required")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise InvalidArgument(field, "must be a task id (a UUID)") from None


def validate_spec(
    spec: task_pb2.TaskSpec,
    *,
    field: str,
    default_max_attempts: int,
    argon2_memory_kib: int | None = None,
) -> tuple[NewTask, Argon2Params | None]:
    """A ``NewTask`` (client id filled in later) and its argon2 parameters, or
    ``InvalidArgument`` naming the field (``specs[3].priority``)."""
    violations = Violations()
    algorithm: Algorithm | None = None
    params: Argon2Params | None = None
    with violations.check():
        algorithm = algorithm_from_wire(spec.algorithm, field=f"{field}.algorithm")
    if algorithm is Algorithm.ARGON2ID:
        with violations.check():
            params = argon2_params(
                spec.argon2, field_prefix=f"{field}.argon2", memory_limit_kib=argon2_memory_kib
            )
    elif algorithm is not None and spec.HasField("argon2"):
        violations.add(
            f"{field}.argon2", f"applies only to ALGORITHM_ARGON2ID, not {algorithm.name}"
        )
    if not -100 <= spec.priority <= 100:
        violations.add(f"{field}.priority", f"must be between -100 and 100, got {spec.priority}")
    if not 0 <= spec.max_attempts <= 100:
        violations.add(
            f"{field}.max_attempts",
            f"must be between 1 and 100 (0: default), got {spec.max_attempts}",
        )
    with violations.check():
        text_field(spec.idempotency_key, f"{field}.idempotency_key", MAX_KEY_LENGTH)
    run_after = None
    if spec.HasField("run_after"):
        try:
            run_after = spec.run_after.ToDatetime(tzinfo=UTC)
        except (ValueError, OverflowError):
            violations.add(f"{field}.run_after", "is not a valid timestamp")
        # A task due in decades would hold a pending slot (and its input) all that time.
        if run_after is not None and run_after > datetime.now(UTC) + MAX_RUN_AFTER:
            violations.add(f"{field}.run_after", "must be at most 366 days from now")
    violations.raise_if_any()
    assert algorithm is not None
    task = NewTask(
        algorithm=algorithm.value,
        data=spec.data,
        params=params.to_json() if params is not None else {},
        priority=spec.priority,
        max_attempts=spec.max_attempts or default_max_attempts,
        run_after=run_after,
        idempotency_key=spec.idempotency_key or None,
    )
    return task, params


# -- page tokens ---------------------------------------------------------------------------


def _filter_fingerprint(filters: ListFilter) -> str:
    canonical = json.dumps(
        [filters.client_id, sorted(s.value for s in filters.statuses), filters.algorithm]
    )
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def encode_page_token(cursor: ListCursor, filters: ListFilter) -> str:
    body = json.dumps(
        {"c": cursor.created_at.isoformat(), "i": cursor.id, "f": _filter_fingerprint(filters)}
    )
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_page_token(token: str, filters: ListFilter) -> ListCursor | None:
    if not token:
        return None
    if len(token) > MAX_PAGE_TOKEN_LENGTH:
        raise InvalidArgument("page_token", "is not a token this service issued (too long)")
    try:
        # RecursionError: JSON nested deeper than the parser goes.
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        cursor = ListCursor(
            created_at=datetime.fromisoformat(body["c"]), id=str(uuid.UUID(body["i"]))
        )
        fingerprint = body["f"]
    except (ValueError, KeyError, TypeError, RecursionError):
        raise InvalidArgument("page_token", "is not a token this service issued") from None
    if fingerprint != _filter_fingerprint(filters):
        raise InvalidArgument(
            "page_token", "was issued for other filters; start again without a token"
        )
    return cursor


def stats_to_wire(
    stats: QueueStats, *, with_workers: bool = True
) -> task_pb2.GetQueueStatsResponse:
    reply = task_pb2.GetQueueStatsResponse(
        counts=[
            task_pb2.StatusCount(status=STATUS_TO_WIRE[s], count=n) for s, n in stats.counts.items()
        ],
        workers_alive=stats.workers_alive,
        completed_last_minute=stats.completed_last_minute,
    )
    reply.oldest_pending_age.FromNanoseconds(int(stats.oldest_pending_seconds * 1e9))
    for worker in stats.workers if with_workers else ():
        reply.workers.append(
            task_pb2.WorkerInfo(
                name=worker.name,
                host=worker.host,
                pid=worker.pid,
                in_flight=worker.in_flight,
                processed=worker.processed,
                alive=worker.alive,
                started_at=_timestamp(worker.started_at),
                last_heartbeat=_timestamp(worker.last_heartbeat),
            )
        )
    return reply


_STATUS_RANK = {TaskStatus.PENDING: 0, TaskStatus.RUNNING: 1, TaskStatus.RETRYING: 2}


def _progress(record: TaskRecord) -> tuple[int, int]:
    """Orders the states one task goes through (RequeueTask starts a new stream anyway)."""
    return (record.attempts, 3 if record.status.final else _STATUS_RANK[record.status])


class TaskService(task_pb2_grpc.TaskServiceServicer):
    def __init__(
        self,
        store: TaskStore,
        settings: HashdSettings,
        *,
        cache: ResultCache | None = None,
        hub: WatchHub | None = None,
    ) -> None:
        self._store = store
        self._settings = settings
        self._cache = cache
        self._hub = hub
        self.limits = PendingLimits(
            max_total=settings.max_pending_tasks,
            max_per_client=settings.max_pending_per_client,
            count=store.unfinished_by_client,
            cost=store.unfinished_cost_by_client,
            max_cost_total=settings.max_pending_cost,
            max_cost_per_client=settings.max_pending_cost_per_client,
        )
        self.priorities = PriorityCaps(settings.max_priority, settings.priority_overrides)
        # Without a configured secret (unit tests: the daemon requires one) a per-process key.
        self._keys = IdempotencyGuard(
            store,
            settings.identity_secret or secrets.token_hex(32),
            window_seconds=settings.idempotency_window_seconds,
        )

    @staticmethod
    def _client_id(value: str) -> str:
        return text_field(value, "client_id", MAX_CLIENT_ID_LENGTH)

    def _require_database(self) -> None:
        # The hub's LISTEN connection drops as soon as PostgreSQL goes away: answer at once
        # instead of waiting for a pool connection that cannot come.
        if self._hub is not None and not self._hub.connected:
            raise Unavailable(
                "database unreachable (reconnecting); retry shortly",
                retry_after=1.0,
                reason="DATABASE_UNAVAILABLE",
            )

    async def _with_cached(self, task: NewTask, params: Argon2Params | None) -> NewTask:
        if self._cache is None:
            return task
        algorithm = Algorithm(task.algorithm)
        if not self._cache.is_cacheable(algorithm, params):
            return task
        hit = await self._cache.lookup(algorithm, params, task.data, tenant=task.client_id)
        if hit is None:
            return task
        return replace(task, cached_result=(hit.digest, hit.encoded))

    async def _submit(
        self, specs: Sequence[task_pb2.TaskSpec], client_id: str, *, field: str
    ) -> list[tuple[TaskRecord, bool]]:
        # Every bad field of every spec is listed, not the first: a batch is fixed in one go.
        violations = Violations()
        validated: list[tuple[NewTask, Argon2Params | None]] = []
        for index, spec in enumerate(specs):
            name = field if field == "spec" else f"{field}[{index}]"
            # gRPC lets hashd receive twice the unary limit (so Hash can explain itself): a
            # task input is held to the limit too, or the queue would store what Hash refuses.
            limit = self._settings.max_message_bytes
            if len(spec.data) > limit:
                advice = "a task input is held to the unary limit; hash it with HashStream"
                violations.include(
                    InputTooLarge(f"{name}.data", len(spec.data), limit, advice=advice)
                )
            with violations.check():
                validated.append(
                    validate_spec(
                        spec,
                        field=name,
                        default_max_attempts=self._settings.default_max_attempts,
                        argon2_memory_kib=self._settings.argon2_memory_limit_kib,
                    )
                )
                self.priorities.check(client_id, validated[-1][0].priority, f"{name}.priority")
        violations.raise_if_any()
        tasks = []
        for index, (task, params) in enumerate(validated):
            if params is not None and self._settings.task_keys is None:
                # An argon2 input is a password: without a key it would be stored in clear.
                name = field if field == "spec" else f"{field}[{index}]"
                raise FailedPrecondition(
                    f"{name}: argon2id tasks are disabled on this replica: no task input key "
                    "is configured (set HASHMESH_TASK_KEY_FILE on hashd and workerd)",
                    reason="ARGON2_TASKS_DISABLED",
                    subject="hashd/HASHMESH_TASK_KEY_FILE",
                    violation_type="SETTING",
                )
            task = self._keys.fingerprinted(task)
            tasks.append(await self._with_cached(replace(task, client_id=client_id), params))
        self._require_database()
        names = [field if field == "spec" else f"{field}[{i}]" for i in range(len(tasks))]
        await self._keys.check(tasks, names, client_id)
        costs = [
            0 if t.cached_result else task_cost(t.algorithm, t.params, len(t.data)) for t in tasks
        ]
        queued = sum(1 for t in tasks if t.cached_result is None)
        # Held from the check to the answer: concurrent calls (sharing one statement) cannot
        # all pass a limit that only one of them fits under.
        async with self.limits.reserve(client_id, queued, sum(costs)) as reservation:
            # The store shares statements and commits between concurrent calls (group commit).
            answers = await self._store.submit_many(tasks)
            new = [
                cost
                for a, cost in zip(answers, costs, strict=True)
                if a.created and a.task.status is TaskStatus.PENDING
            ]
            reservation.stored(len(new), sum(new))
        self._keys.check_answers(tasks, answers, names)
        for answer in answers:  # idempotent repeats (created False) are not new submissions
            if answer.created:
                metrics.TASKS_SUBMITTED.labels(answer.task.algorithm).inc()
        return [(a.task, a.created) for a in answers]

    async def SubmitTask(
        self, request: task_pb2.SubmitTaskRequest, context: Context
    ) -> task_pb2.SubmitTaskResponse:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        [(record, created)] = await self._submit(
            [request.spec],
            client_of(self._client_id(request.client_id), current_caller()),
            field="spec",
        )
        return task_pb2.SubmitTaskResponse(task=task_to_wire(record), created=created)

    async def SubmitTasks(
        self, request: task_pb2.SubmitTasksRequest, context: Context
    ) -> task_pb2.SubmitTasksResponse:
        if not request.specs:
            raise InvalidArgument("specs", "must hold at least one task")
        if len(request.specs) > MAX_BATCH:
            raise InvalidArgument(
                "specs", f"at most {MAX_BATCH} tasks per batch, got {len(request.specs)}"
            )
        answers = await self._submit(
            request.specs,
            client_of(self._client_id(request.client_id), current_caller()),
            field="specs",
        )
        return task_pb2.SubmitTasksResponse(
            tasks=[task_to_wire(record) for record, _ in answers],
            created=[created for _, created in answers],
        )

    async def GetTask(
        self, request: task_pb2.GetTaskRequest, context: Context
    ) -> task_pb2.GetTaskResponse:
        task_id = task_id_of(request.id)
        record = await self._store.get(task_id, owner=current_caller().scope)
        return task_pb2.GetTaskResponse(task=task_to_wire(record))

    def _watch_hub(self) -> WatchHub:
        if self._hub is None:
            raise Unavailable(
                "watching is not available on this replica",
                retry_after=1.0,
                reason="DATABASE_UNAVAILABLE",
            )
        return self._hub

    async def WatchTask(
        self, request: task_pb2.WatchTaskRequest, context: Context
    ) -> AsyncIterator[task_pb2.WatchTaskResponse]:
        task_id = task_id_of(request.id)
        owner = current_caller().scope
        hub = self._watch_hub()
        with hub.subscribe(task_id) as sub:
            record = hub.recent(task_id, owner=owner) or await self._store.get(task_id, owner=owner)
            async for task in self._follow(sub, record, owner):
                yield task_pb2.WatchTaskResponse(task=task)

    async def SubmitAndWatchTask(
        self, request: task_pb2.SubmitAndWatchTaskRequest, context: Context
    ) -> AsyncIterator[task_pb2.SubmitAndWatchTaskResponse]:
        if not request.HasField("spec"):
            raise InvalidArgument("spec", "is required")
        client_id = client_of(self._client_id(request.client_id), current_caller())
        hub = self._watch_hub()
        with contextlib.ExitStack() as watching:
            # The task's id is known only once it is stored, when a worker may have run it
            # already: the hub keeps what it is notified from before the insert, and the
            # subscription starts with what came since.
            with hub.catching_up() as mark:
                [(record, created)] = await self._submit([request.spec], client_id, field="spec")
                sub = watching.enter_context(hub.subscribe(record.id, since=mark))
            async for task in self._follow(sub, record, current_caller().scope):
                yield task_pb2.SubmitAndWatchTaskResponse(task=task, created=created)

    async def _follow(
        self, sub: Subscription, record: TaskRecord, owner: str | None
    ) -> AsyncIterator[task_pb2.Task]:
        """``record``, then each change of status the subscription brings, until final."""
        task_id = record.id
        last: tuple[TaskStatus, int, bool] | None = None
        while True:
            key = (record.status, record.attempts, record.cancel_requested)
            if key != last:
                yield task_to_wire(record)
                last = key
            if record.status.final:
                return
            update = await sub.next(WATCH_POLL_SECONDS)
            if update is None:
                record = await self._store.get(task_id, owner=owner)
                continue
            notified, fresh = update
            if _progress(fresh) < _progress(record):
                continue  # read before a state already streamed
            record = fresh
            if notified is not record.status and notified is not last[0] and not notified.final:
                # A state that ended before we read it: stream it as it was announced.
                passed = task_to_wire(record)
                passed.status = STATUS_TO_WIRE[notified]
                passed.ClearField("result")
                passed.ClearField("finished_at")
                yield passed
                last = (notified, record.attempts, record.cancel_requested)

    async def ListTasks(
        self, request: task_pb2.ListTasksRequest, context: Context
    ) -> task_pb2.ListTasksResponse:
        # Sizes first: a request of millions of packed statuses must not cost a loop over them.
        if len(request.statuses) > len(STATUS_TO_WIRE):
            raise InvalidArgument(
                "statuses",
                f"at most {len(STATUS_TO_WIRE)} entries (one per status), got {len(request.statuses)}",
            )
        if len(request.page_token) > MAX_PAGE_TOKEN_LENGTH:
            raise InvalidArgument("page_token", "is not a token this service issued (too long)")
        violations = Violations()
        statuses = []
        for index, status in enumerate(request.statuses):
            if status not in STATUS_FROM_WIRE:
                violations.add(f"statuses[{index}]", "must be a task status (not UNSPECIFIED)")
            else:
                statuses.append(STATUS_FROM_WIRE[status])
        algorithm = None
        if request.algorithm != common_pb2.ALGORITHM_UNSPECIFIED:
            with violations.check():
                algorithm = algorithm_from_wire(request.algorithm).value
        if request.page_size < 0:
            violations.add("page_size", f"must not be negative, got {request.page_size}")
        with violations.check():
            text_field(request.client_id, "client_id", MAX_CLIENT_ID_LENGTH)
        violations.raise_if_any()
        filters = ListFilter(
            client_id=list_scope(self._client_id(request.client_id), current_caller()),
            statuses=tuple(statuses),
            algorithm=algorithm,
        )
        after = decode_page_token(request.page_token, filters)
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)  # AIP-158: cap
        rows = await self._store.list_tasks(filters, limit=size + 1, after=after)
        reply = task_pb2.ListTasksResponse(tasks=[task_to_wire(r) for r in rows[:size]])
        if len(rows) > size:
            last = rows[size - 1]
            reply.next_page_token = encode_page_token(ListCursor(last.created_at, last.id), filters)
        return reply

    async def CancelTask(
        self, request: task_pb2.CancelTaskRequest, context: Context
    ) -> task_pb2.CancelTaskResponse:
        task_id = task_id_of(request.id)
        record = await self._store.cancel(task_id, owner=current_caller().scope)
        return task_pb2.CancelTaskResponse(task=task_to_wire(record))

    async def RequeueTask(
        self, request: task_pb2.RequeueTaskRequest, context: Context
    ) -> task_pb2.RequeueTaskResponse:
        task_id = task_id_of(request.id)
        record = await self._store.requeue(task_id, owner=current_caller().scope)
        return task_pb2.RequeueTaskResponse(task=task_to_wire(record))

    async def GetQueueStats(
        self, request: task_pb2.GetQueueStatsRequest, context: Context
    ) -> task_pb2.GetQueueStatsResponse:
        # Totals for everyone; which workers run where (names, hosts, PIDs) for operators only.
        stats = await self._store.stats(alive_seconds=self._settings.worker_alive_seconds)
        return stats_to_wire(stats, with_workers=current_caller().operator)
