"""Following a task until it ends: WatchTask, or GetTask polling when the server does not
implement WatchTask; and submitting one task and following it in one call
(SubmitAndWatchTask), or in two when the server predates it. The one wait behind ``hashctl
submit --wait``, ``task watch`` and the ``hashctl up --demo`` tour."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import grpc

from hashmesh.cli.naming import FINAL_STATUSES
from hashmesh.v1 import task_pb2, task_pb2_grpc

POLL_SECONDS = 0.2
"""Between two GetTask calls when WatchTask is not there."""


class NotAccepted(Exception):
    """No answer to the submission within ``timeout``: the task may or may not be queued."""

    def __init__(self, timeout: float) -> None:
        super().__init__(
            f"no answer to the submission within {timeout}s: the task may or may not be "
            "queued (submit again with the same --idempotency-key to find out)"
        )


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


def submit_and_follow(
    stub: task_pb2_grpc.TaskServiceStub,
    request: task_pb2.SubmitTaskRequest,
    *,
    timeout: float | None,
    call_timeout: float,
    metadata: tuple[tuple[str, str | bytes], ...] = (),
) -> Iterator[tuple[task_pb2.Task, bool]]:
    """(task, created) as accepted, then at each change of status, ending at a final state:
    one SubmitAndWatchTask call. ``call_timeout`` bounds the wait for the acceptance (as it
    bounds a SubmitTask), ``timeout`` the whole wait."""
    call = stub.SubmitAndWatchTask(
        task_pb2.SubmitAndWatchTaskRequest(spec=request.spec, client_id=request.client_id),
        timeout=timeout,
        metadata=metadata,
    )
    # A stream's deadline must let a long task finish; the acceptance gets a unary call's.
    unanswered = threading.Event()

    def give_up() -> None:
        unanswered.set()
        call.cancel()

    timer = threading.Timer(call_timeout, give_up)
    timer.daemon = True
    timer.start()
    try:
        first = next(call)
    except grpc.RpcError as err:
        if unanswered.is_set():
            raise NotAccepted(call_timeout) from None
        if err.code() is not grpc.StatusCode.UNIMPLEMENTED:
            raise
        yield from _submit_then_follow(stub, request, timeout, call_timeout, metadata)
        return
    finally:
        timer.cancel()
    last = first.task
    try:
        yield last, first.created
        for reply in call:
            last = reply.task
            yield last, reply.created
    except grpc.RpcError as err:
        if err.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
            raise TaskDidNotFinish(last.id, timeout or 0.0, last) from None
        raise
    finally:
        call.cancel()  # a caller that stops reading ends the stream (never the task)


def _submit_then_follow(
    stub: task_pb2_grpc.TaskServiceStub,
    request: task_pb2.SubmitTaskRequest,
    timeout: float | None,
    call_timeout: float,
    metadata: tuple[tuple[str, str | bytes], ...],
) -> Iterator[tuple[task_pb2.Task, bool]]:
    """A server without SubmitAndWatchTask: SubmitTask, then ``follow_task``."""
    reply = stub.SubmitTask(request, timeout=call_timeout, metadata=metadata)
    yield reply.task, reply.created
    if reply.task.status in FINAL_STATUSES:
        return
    last = reply.task.status
    for task in follow_task(
        stub, reply.task.id, timeout=timeout, call_timeout=call_timeout, metadata=metadata
    ):
        if task.status != last:  # the watch starts with the state just answered
            last = task.status
            yield task, reply.created
