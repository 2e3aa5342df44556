"""The short tour ``hashctl up --demo`` runs through the balancer once the mesh is up:
digests checked against hashlib, then a task submitted and waited for."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable

import grpc

from hashmesh.cli.client import sync_channel
from hashmesh.cli.follow import TaskDidNotFinish, follow_task
from hashmesh.core.tls import ClientTls
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc

INPUTS = (b"hello", b"hashmesh", b"")
ALGORITHMS = ((common_pb2.ALGORITHM_MD5, "md5"), (common_pb2.ALGORITHM_SHA256, "sha256"))


def run_demo(
    target: str,
    say: Callable[[str, bool | None], None],
    timeout: float = 60.0,
    tls: ClientTls | None = None,
) -> bool:
    """Run the tour against ``target``; ``say(line, ok)`` prints each step. True if all passed."""
    passed = True
    with sync_channel(target, tls) as channel:
        grpc.channel_ready_future(channel).result(timeout=10)
        hasher = hash_pb2_grpc.HashServiceStub(channel)
        for algorithm, name in ALGORITHMS:
            for data in INPUTS:
                reply = hasher.ComputeHash(
                    hash_pb2.HashRequest(algorithm=algorithm, data=data), timeout=10
                )
                expected = hashlib.new(name, data).hexdigest()
                ok = reply.result.encoded == expected
                passed &= ok
                say(
                    f"{name}({data.decode()!r}) = {reply.result.encoded}"
                    + ("  matches hashlib" if ok else f"  MISMATCH, hashlib says {expected}"),
                    ok,
                )
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        submitted = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(
                    algorithm=common_pb2.ALGORITHM_SHA256, data=b"hello from a task"
                )
            ),
            timeout=10,
        ).task
        say(
            f"task {submitted.id} submitted (sha256 of 'hello from a task'); waiting for a worker",
            None,
        )
        task = _wait(tasks, submitted, timeout)
        expected = hashlib.sha256(b"hello from a task").hexdigest()
        ok = task.status == task_pb2.TASK_STATUS_SUCCEEDED and task.result.encoded == expected
        passed &= ok
        status = task_pb2.TaskStatus.Name(task.status).removeprefix("TASK_STATUS_").lower()
        say(
            f"task {task.id} {status} on {task.worker or '?'}: {task.result.encoded or task.last_error}"
            + ("  matches hashlib" if ok else ""),
            ok,
        )
    return passed


def _wait(
    stub: task_pb2_grpc.TaskServiceStub, task: task_pb2.Task, timeout: float
) -> task_pb2.Task:
    """The task's last state: final, or the one it had when ``timeout`` ran out."""
    last = task
    with contextlib.suppress(TaskDidNotFinish):
        for last in follow_task(stub, task.id, timeout=timeout, call_timeout=10.0):  # noqa: B007 - the last state is the answer
            pass
    return last
