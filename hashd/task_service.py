"""TaskService: durable tasks in PostgreSQL, run by workerd."""

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2

from hashmesh.core.errors import InvalidArgument
from hashmesh.core.hashing import Algorithm
from hashmesh.core.tasks.model import NewTask, TaskRecord, TaskStatus
from hashmesh.core.tasks.store import PostgresTaskStore
from hashmesh.core.wire import algorithm_from_wire, algorithm_to_wire
from hashmesh.hashd.config import HashdSettings
from hashmesh.hashd.hash_service import argon2_params
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

STATUS_TO_WIRE: dict[TaskStatus, task_pb2.TaskStatus.ValueType] = {
    TaskStatus.PENDING: task_pb2.TASK_STATUS_PENDING,
    TaskStatus.RUNNING: task_pb2.TASK_STATUS_RUNNING,
    TaskStatus.RETRYING: task_pb2.TASK_STATUS_RETRYING,
    TaskStatus.SUCCEEDED: task_pb2.TASK_STATUS_SUCCEEDED,
    TaskStatus.CANCELLED: task_pb2.TASK_STATUS_CANCELLED,
    TaskStatus.DEAD_LETTER: task_pb2.TASK_STATUS_DEAD_LETTER,
}


def _timestamp(value: object) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)  # type: ignore[arg-type]
    return stamp


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


def client_id_of(explicit: str, context: grpc.aio.ServicerContext) -> str:
    if explicit:
        return explicit
    for key, value in context.invocation_metadata() or ():
        if key == "x-client-id" and value:
            return str(value)
    return "anonymous"


class TaskService(task_pb2_grpc.TaskServiceServicer):
    def __init__(self, store: PostgresTaskStore, settings: HashdSettings) -> None:
        self._store = store
        self._settings = settings

    def _new_task(self, spec: task_pb2.TaskSpec, client_id: str, field: str) -> NewTask:
        algorithm = algorithm_from_wire(spec.algorithm, field=f"{field}.algorithm")
        params = {}
        if algorithm is Algorithm.ARGON2ID:
            params = argon2_params(spec.argon2, field_prefix=f"{field}.argon2").to_json()
        if not -100 <= spec.priority <= 100:
            raise InvalidArgument(f"{field}.priority", "must be between -100 and 100")
        if spec.max_attempts > 100:
            raise InvalidArgument(f"{field}.max_attempts", "must be between 1 and 100")
        return NewTask(
            algorithm=algorithm.value,
            data=spec.data,
            params=params,
            priority=spec.priority,
            max_attempts=spec.max_attempts or self._settings.default_max_attempts,
            run_after=spec.run_after.ToDatetime(tzinfo=None) if spec.HasField("run_after") else None,
            client_id=client_id,
            idempotency_key=spec.idempotency_key or None,
        )

    async def SubmitTask(
        self, request: task_pb2.SubmitTaskRequest, context: grpc.aio.ServicerContext
    ) -> task_pb2.SubmitTaskResponse:
        new = self._new_task(request.spec, client_id_of(request.client_id, context), "spec")
        record = await self._store.submit(new)
        return task_pb2.SubmitTaskResponse(task=task_to_wire(record), created=True)

    async def GetTask(self, request: task_pb2.GetTaskRequest, context: grpc.aio.ServicerContext) -> task_pb2.GetTaskResponse:
        if not request.id:
            raise InvalidArgument("id", "is required")
        return task_pb2.GetTaskResponse(task=task_to_wire(await self._store.get(request.id)))
