"""Faults with real processes and a real PostgreSQL: a task accepted by SubmitTask reaches
exactly one final state, and no result is written twice (``completions`` counts writes)."""

from __future__ import annotations

import hashlib
import itertools
import time
from collections.abc import Callable
from datetime import datetime

import grpc
import psycopg
import pytest

from hashmesh.core.embedded_pg import EmbeddedPostgres
from hashmesh.core.sealing import TaskKeyring
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes

FAST_LEASES = {
    "HASHMESH_TASK_LEASE_SECONDS": "1.5",
    "HASHMESH_WORKERD_HEARTBEAT_SECONDS": "0.2",
    "HASHMESH_WORKERD_POLL_SECONDS": "0.5",
}


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return dict(
            conn.execute("SELECT status, count(*) FROM hashmesh_tasks GROUP BY 1").fetchall()
        )


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        time.sleep(0.05)


def written_more_than_once(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM hashmesh_tasks WHERE completions > 1 "
            "OR (status = 'succeeded' AND completions <> 1 AND NOT cached)"
        ).fetchone()
    assert row is not None
    return int(row[0])


def md5_batch(start: int, size: int) -> task_pb2.SubmitTasksRequest:
    return task_pb2.SubmitTasksRequest(
        specs=[
            task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"task-%d" % i)
            for i in range(start, start + size)
        ]
    )


def test_kill_9_of_a_worker_holding_a_claimed_batch(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn)
    params = common_pb2.Argon2Params(time_cost=1, memory_cost_kib=16 * 1024, parallelism=1)
    with grpc.insecure_channel(hashd.address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        stub.SubmitTasks(
            task_pb2.SubmitTasksRequest(
                specs=[
                    task_pb2.TaskSpec(
                        algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw-%d" % i, argon2=params
                    )
                    for i in range(60)
                ]
            ),
            timeout=10,
        )
    victim = procs.workerd(
        dsn, "--name", "victim", "--concurrency", "30", "--cpu-workers", "1", env=FAST_LEASES
    )
    wait_for(lambda: counts(dsn).get("succeeded", 0) >= 3, 30, "victim finished a few tasks")
    victim.kill()
    with psycopg.connect(dsn) as conn:
        held = [
            r[0]
            for r in conn.execute(
                "SELECT id FROM hashmesh_tasks WHERE status = 'running' AND worker = 'victim'"
            ).fetchall()
        ]
    assert held, "the victim held no claimed tasks when killed"
    procs.workerd(dsn, "--name", "rescuer", env=FAST_LEASES)
    wait_for(lambda: counts(dsn) == {"succeeded": 60}, 60, "every task succeeded")
    assert written_more_than_once(dsn) == 0
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT attempts, worker, last_error, input FROM hashmesh_tasks WHERE id = ANY(%s)",
            (held,),
        ).fetchall()
    for attempts, worker, last_error, input_ in rows:
        assert (
            attempts >= 2
            and worker == "rescuer"
            and "lease expired" in last_error
            and input_ is None
        )


def test_two_workers_share_ten_thousand_tasks(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn)
    procs.workerd(dsn, "--name", "w-a")
    procs.workerd(dsn, "--name", "w-b")
    with grpc.insecure_channel(hashd.address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        for start in range(0, 10_000, 1000):
            stub.SubmitTasks(md5_batch(start, 1000), timeout=30)
    wait_for(lambda: counts(dsn) == {"succeeded": 10_000}, 90, "10,000 tasks succeeded")
    assert written_more_than_once(dsn) == 0
    with psycopg.connect(dsn) as conn:
        shares = dict(
            conn.execute("SELECT worker, count(*) FROM hashmesh_tasks GROUP BY 1").fetchall()
        )
        rows = conn.execute(
            "SELECT id, algorithm, params, input, input_key_id, result_encoded FROM hashmesh_tasks"
        ).fetchall()
    assert set(shares) == {"w-a", "w-b"} and min(shares.values()) >= 1000, shares
    # Inputs are sealed at rest: open each one as workerd did, then check its result.
    keys = TaskKeyring.from_env()
    assert keys is not None and all(row[4] == keys.active_id for row in rows)
    inputs = {row[5]: keys.open(row[4], str(row[0]), row[1], row[2], row[3]) for row in rows}
    assert all(hashlib.md5(data).hexdigest() == result for result, data in inputs.items())
    assert sorted(inputs.values()) == sorted(b"task-%d" % i for i in range(10_000))


def test_postgres_restart_mid_run(owned_pg: EmbeddedPostgres, procs: Processes) -> None:
    dsn = owned_pg.dsn
    env = {**FAST_LEASES, "HASHMESH_TASK_LEASE_SECONDS": "3", "HASHMESH_DB_POOL_TIMEOUT": "2"}
    hashd = procs.hashd(dsn, env=env)
    procs.workerd(dsn, "--name", "survivor", "--cpu-workers", "1", env=env)
    params = common_pb2.Argon2Params(time_cost=1, memory_cost_kib=8 * 1024, parallelism=1)
    with grpc.insecure_channel(hashd.address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        # Slow tasks first (~10 ms each, one thread): the restart lands in the middle of them.
        stub.SubmitTasks(
            task_pb2.SubmitTasksRequest(
                specs=[
                    task_pb2.TaskSpec(
                        algorithm=common_pb2.ALGORITHM_ARGON2ID,
                        data=b"pw-%d" % i,
                        argon2=params,
                        priority=1,
                    )
                    for i in range(200)
                ]
            ),
            timeout=10,
        )
        stub.SubmitTasks(md5_batch(0, 2800), timeout=30)
        wait_for(lambda: counts(dsn).get("succeeded", 0) >= 5, 30, "the run started")
        before = counts(dsn)
        owned_pg.stop()
        assert before.get("succeeded", 0) < 3000, before
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitTask(
                task_pb2.SubmitTaskRequest(spec=md5_batch(9999, 1).specs[0]), timeout=20
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
        refused_after = time.monotonic() - started
        owned_pg.start()
        # hashd reconnects by itself: submissions are accepted again.
        deadline = time.monotonic() + 30
        while True:
            try:
                stub.SubmitTasks(md5_batch(3000, 1000), timeout=10)
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, (
                    exc
                )
                time.sleep(0.2)
    wait_for(
        lambda: counts(dsn) == {"succeeded": 4000}, 60, "all 4000 tasks succeeded after the restart"
    )
    assert written_more_than_once(dsn) == 0
    assert refused_after < 20  # answered, not left to the deadline
    logs = "".join(proc.log() for proc in procs.started)
    assert "LISTEN connection lost" in logs  # the outage was seen, and survived


def test_always_failing_task_dead_letters_with_backoff(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn)
    procs.workerd(
        dsn,
        env={
            **FAST_LEASES,
            "HASHMESH_WORKERD_FAIL_ALGORITHMS": "sha1",
            "HASHMESH_TASK_RETRY_BASE": "0.2",
            "HASHMESH_TASK_RETRY_CAP": "0.8",
        },
    )
    with grpc.insecure_channel(hashd.address) as channel:
        stub = task_pb2_grpc.TaskServiceStub(channel)
        spec = task_pb2.TaskSpec(
            algorithm=common_pb2.ALGORITHM_SHA1, data=b"doomed", max_attempts=4
        )
        task_id = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10).task.id
        seen = [m.task for m in stub.WatchTask(task_pb2.WatchTaskRequest(id=task_id), timeout=30)]
        final = seen[-1]
        assert final.status == task_pb2.TASK_STATUS_DEAD_LETTER and final.attempts == 4
        assert "injected failure" in final.last_error
        assert task_pb2.TASK_STATUS_RETRYING in {t.status for t in seen}
        check_backoff(dsn, task_id, attempts=4, base=0.2, cap=0.8)

        requeued = stub.RequeueTask(task_pb2.RequeueTaskRequest(id=task_id), timeout=10).task
        assert requeued.status == task_pb2.TASK_STATUS_PENDING and requeued.attempts == 0
        again = [m.task for m in stub.WatchTask(task_pb2.WatchTaskRequest(id=task_id), timeout=30)][
            -1
        ]
        assert again.status == task_pb2.TASK_STATUS_DEAD_LETTER and again.attempts == 4


def check_backoff(dsn: str, task_id: str, *, attempts: int, base: float, cap: float) -> None:
    """From the attempt log: each retry waited between half and all of base * 2^(n-1)
    (capped), and the next attempt started only after that."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT failures FROM hashmesh_tasks WHERE id = %s", (task_id,)
        ).fetchone()
    assert row is not None
    failures = row[0]
    assert [f["attempt"] for f in failures] == list(range(1, attempts + 1))
    assert failures[-1]["retry_at"] is None  # the last one went to DEAD_LETTER
    delays = []
    for n, (failed, following) in enumerate(itertools.pairwise(failures), start=1):
        retry_at = datetime.fromisoformat(failed["retry_at"])
        delay = (retry_at - datetime.fromisoformat(failed["failed_at"])).total_seconds()
        nominal = min(cap, base * 2 ** (n - 1))
        assert nominal / 2 - 0.001 <= delay <= nominal + 0.001
        assert datetime.fromisoformat(following["started_at"]) >= retry_at
        delays.append(delay)
    assert delays == sorted(delays)
