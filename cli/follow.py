"""Following a task until it ends: WatchTask, or GetTask polling when the server does not
implement WatchTask. The one wait behind ``hashctl submit --wait``, ``task watch`` and the
``hashctl up --demo`` tour."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc

from hashmesh.cli.naming import FINAL_STATUSES
from hashmesh.v1 import task_pb2, task_pb2_grpc

POLL_SECONDS = 0.2
"""Between two GetTask calls when WatchTask is not there."""


class TaskDidNotFinish(Exception):
    """The task was still unfinished when ``timeout`` ran out; ``last`` is its last state."""

    def __init__(self, task_id: str, timeout: float, last: task_pb2.Task | None) -> None:
        super().__init__(f"task {task_id} did not finish in {timeout}s")
        self.last = last


def follow_task(
    stub: task_pb2_grpc.TaskServiceStub,
    task_id: str,
    *,
    timeout: float | None,
    call_timeout: float,
    metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> Iterator[task_pb2.Task]:
    """Each state of the task as it changes, ending at a final state."""
    try:
        for reply in stub.WatchTask(task_pb2.WatchTaskRequest(id=task_id), timeout=timeout,
                                    metadata=metadata):  # fmt: skip
            yield reply.task
        return
    except grpc.RpcError as err:
        if err.code() is not grpc.StatusCode.UNIMPLEMENTED:
            raise
    deadline = None if timeout is None else time.monotonic() + timeout
    last: task_pb2.Task | None = None
    while True:
        task = stub.GetTask(task_pb2.GetTaskRequest(id=task_id), timeout=call_timeout,
                            metadata=metadata).task  # fmt: skip
        if last is None or task.status != last.status:
            last = task
            yield task
        if task.status in FINAL_STATUSES:
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TaskDidNotFinish(task_id, timeout or 0.0, last)
        time.sleep(POLL_SECONDS)
