"""workerd as a real process: registration, graceful SIGTERM, hand-back, cooperative cancel."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import psycopg
import pytest

from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes

# Slow enough (~0.1-0.3 s each here) to be caught mid-flight, cheap enough for a test.
ARGON2 = common_pb2.Argon2Params(time_cost=2, memory_cost_kib=32 * 1024, parallelism=1)
FAST = {"HASHMESH_WORKERD_HEARTBEAT_SECONDS": "0.2", "HASHMESH_WORKERD_POLL_SECONDS": "0.5"}


@pytest.fixture
def stub(dsn: str, procs: Processes) -> Iterator[task_pb2_grpc.TaskServiceStub]:
    with grpc.insecure_channel(procs.hashd(dsn).address) as channel:
        yield task_pb2_grpc.TaskServiceStub(channel)


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute("SELECT status, count(*) FROM hashmesh_tasks GROUP BY 1").fetchall()
        )


def wait_for(predicate: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def test_sigterm_finishes_in_flight_and_hands_back_the_rest(
    dsn: str, procs: Processes, stub: task_pb2_grpc.TaskServiceStub
) -> None:
    specs = [
        task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw%d" % i, argon2=ARGON2)
        for i in range(12)
    ]
    stub.SubmitTasks(task_pb2.SubmitTasksRequest(specs=specs), timeout=10)
    worker = procs.workerd(
        dsn, "--name", "graceful", "--concurrency", "12", "--cpu-workers", "1", env=FAST
    )
    # The whole batch is claimed (none pending) and at least one task is done.
    wait_for(lambda: "pending" not in counts(dsn) and counts(dsn).get("succeeded", 0) >= 1)
    assert worker.terminate() == 0
    after = counts(dsn)
    # Nothing left running: each task either finished or was handed back untouched.
    assert set(after) <= {"succeeded", "pending"} and sum(after.values()) == 12
    assert after.get("pending", 0) >= 1
    with psycopg.connect(dsn) as conn:
        handed_back = conn.execute(
            "SELECT attempts, worker, started_at FROM hashmesh_tasks WHERE status = 'pending'"
        ).fetchall()
        assert all(row == (0, None, None) for row in handed_back)
        row = conn.execute(
            "SELECT host, pid, processed, in_flight, stopped_at IS NOT NULL "
            "FROM hashmesh_workers WHERE name = 'graceful'"
        ).fetchone()
    assert (
        row is not None
        and row[1] == worker.pid
        and row[2] == after["succeeded"]
        and row[3] == 0
        and row[4]
    )
    assert "workerd ready as graceful" in worker.log()
    # Another worker finishes the rest.
    procs.workerd(dsn, "--name", "second", env=FAST)
    wait_for(lambda: counts(dsn) == {"succeeded": 12})


def test_running_task_is_cancelled_cooperatively(
    dsn: str, procs: Processes, stub: task_pb2_grpc.TaskServiceStub
) -> None:
    # The lowest priority runs last: it is still running (or waiting for the CPU) when cancelled.
    specs = [
        task_pb2.TaskSpec(
            algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw%d" % i, argon2=ARGON2, priority=5 - i
        )
        for i in range(6)
    ]
    ids = [
        t.id for t in stub.SubmitTasks(task_pb2.SubmitTasksRequest(specs=specs), timeout=10).tasks
    ]
    procs.workerd(dsn, "--concurrency", "6", "--cpu-workers", "1", env=FAST)
    wait_for(lambda: "pending" not in counts(dsn))
    reply = stub.CancelTask(task_pb2.CancelTaskRequest(id=ids[-1]), timeout=10).task
    assert reply.status == task_pb2.TASK_STATUS_RUNNING and reply.cancel_requested
    final = [m.task for m in stub.WatchTask(task_pb2.WatchTaskRequest(id=ids[-1]), timeout=30)][-1]
    assert final.status == task_pb2.TASK_STATUS_CANCELLED and not final.HasField("result")
    wait_for(lambda: counts(dsn) == {"succeeded": 5, "cancelled": 1})


def test_scheduled_task_runs_at_its_time_without_polling(
    dsn: str, procs: Processes, stub: task_pb2_grpc.TaskServiceStub
) -> None:
    # The safety poll is 60 s: only the NOTIFY-announced due time can start it within the watch.
    procs.workerd(dsn, "--name", "scheduler", env={"HASHMESH_WORKERD_POLL_SECONDS": "60"})
    # The worker LISTENs before it says it is ready: the NOTIFY below cannot be missed.
    with psycopg.connect(dsn) as conn:
        listening = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
            ("workerd-listen:scheduler",),
        ).fetchone()
    assert listening == (1,)
    spec = task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA256, data=b"later")
    spec.run_after.GetCurrentTime()
    spec.run_after.nanos = (spec.run_after.nanos + 500_000_000) % 1_000_000_000
    spec.run_after.seconds += 1 if spec.run_after.nanos < 500_000_000 else 0
    task_id = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10).task.id
    final = [m.task for m in stub.WatchTask(task_pb2.WatchTaskRequest(id=task_id), timeout=15)][-1]
    assert final.status == task_pb2.TASK_STATUS_SUCCEEDED
    assert final.started_at.ToNanoseconds() >= spec.run_after.ToNanoseconds()


def test_sigterm_while_waiting_for_the_database_exits_cleanly() -> None:
    import signal
    import subprocess
    import sys

    from hashmesh.core.queue.embedded_pg import free_port

    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres?connect_timeout=1"
    worker = subprocess.Popen(
        [sys.executable, "-m", "hashmesh.workerd", "--database-url", unreachable],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert worker.stdout is not None
        early = []
        for line in worker.stdout:  # until it says it retries (the test's timeout bounds it)
            early.append(line)
            if "retrying" in line:
                break
        assert worker.poll() is None, "".join(early)
        worker.send_signal(signal.SIGTERM)
        rest, _ = worker.communicate(timeout=15)
        output = "".join(early) + rest
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)
    assert worker.returncode == 0, output
    assert "workerd ready" not in output and "retrying" in output
