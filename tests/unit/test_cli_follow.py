"""``hashctl submit --wait``'s one call (cli.follow.submit_and_follow) against small in-process
TaskService servers: a server that predates SubmitAndWatchTask gets SubmitTask then WatchTask,
and a submission left unanswered ends with NotAccepted, not a hang."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from hashmesh.cli.follow import NotAccepted, submit_and_follow
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

pytestmark = pytest.mark.timeout(60)

REQUEST = task_pb2.SubmitTaskRequest(
    spec=task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"x")
)


class BeforeSubmitAndWatch(task_pb2_grpc.TaskServiceServicer):
    """SubmitTask and WatchTask only: SubmitAndWatchTask answers UNIMPLEMENTED."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def SubmitTask(
        self, request: task_pb2.SubmitTaskRequest, context: grpc.ServicerContext
    ) -> task_pb2.SubmitTaskResponse:
        self.calls.append("SubmitTask")
        task = task_pb2.Task(id="t-1", status=task_pb2.TASK_STATUS_PENDING)
        return task_pb2.SubmitTaskResponse(task=task, created=True)

    def WatchTask(
        self, request: task_pb2.WatchTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[task_pb2.WatchTaskResponse]:
        self.calls.append(f"WatchTask {request.id}")
        for status in (task_pb2.TASK_STATUS_PENDING, task_pb2.TASK_STATUS_SUCCEEDED):
            yield task_pb2.WatchTaskResponse(task=task_pb2.Task(id=request.id, status=status))


class Silent(task_pb2_grpc.TaskServiceServicer):
    """Takes SubmitAndWatchTask and never answers (until released)."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def SubmitAndWatchTask(
        self, request: task_pb2.SubmitAndWatchTaskRequest, context: grpc.ServicerContext
    ) -> Iterator[task_pb2.SubmitAndWatchTaskResponse]:
        self.release.wait(30)
        return iter(())


def serving(servicer: task_pb2_grpc.TaskServiceServicer) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    task_pb2_grpc.add_TaskServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


def test_a_server_without_the_one_call_is_asked_in_two() -> None:
    servicer = BeforeSubmitAndWatch()
    server, address = serving(servicer)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            seen = list(submit_and_follow(stub, REQUEST, timeout=10, call_timeout=10))
    finally:
        server.stop(None)
    assert servicer.calls == ["SubmitTask", "WatchTask t-1"]
    assert [(t.status, created) for t, created in seen] == [
        (task_pb2.TASK_STATUS_PENDING, True),
        (task_pb2.TASK_STATUS_SUCCEEDED, True),
    ]


def test_an_unanswered_submission_gives_up_after_the_call_timeout() -> None:
    servicer = Silent()
    server, address = serving(servicer)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            with pytest.raises(NotAccepted, match="may or may not be queued"):
                list(submit_and_follow(stub, REQUEST, timeout=None, call_timeout=0.5))
    finally:
        servicer.release.set()
        server.stop(None)
