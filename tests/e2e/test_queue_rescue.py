"""Rescue in seconds with real workerd processes: a SIGKILLed worker's tasks are claimable again
as soon as PostgreSQL drops its connection (its session lock vanishes), not after its lease; a
SIGSTOPped one (connection alive) is caught by its lease; a restarted worker does not wait for
its previous self. Times are read from the task rows and the database clock, never the test's.
Every task ends SUCCEEDED with exactly one result write."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta
from typing import Any

import grpc
import psycopg

from hashmesh.core.queue.store import SESSION_SETTLE_SECONDS
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.e2e.test_queue_faults import counts, wait_for, written_more_than_once

LONG_LEASE = {"HASHMESH_TASK_LEASE_SECONDS": "120", "HASHMESH_WORKERD_HEARTBEAT_SECONDS": "1"}
"""A lease far longer than any bound below: a rescue within the bound is not the lease's."""
RESCUE_BOUND = timedelta(seconds=20)
"""Generous for a loaded 2-core machine; the reaper runs every second (README: ~1-2 s)."""


def submit_argon2(address: str, n: int) -> None:
    # ~50-100 ms each on one thread: a worker still holds most of its batch when it is killed.
    params = common_pb2.Argon2Params(time_cost=2, memory_cost_kib=16 * 1024, parallelism=1)
    with grpc.insecure_channel(address) as channel:
        task_pb2_grpc.TaskServiceStub(channel).SubmitTasks(
            task_pb2.SubmitTasksRequest(
                specs=[
                    task_pb2.TaskSpec(
                        algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw-%d" % i, argon2=params
                    )
                    for i in range(n)
                ]
            ),
            timeout=20,
        )


def db_now(dsn: str) -> datetime:
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def held_by(dsn: str, worker: str) -> list[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id FROM hashmesh_tasks WHERE status = 'running' AND worker = %s", (worker,)
        ).fetchall()
    return [str(r[0]) for r in rows]


def taken_from(dsn: str, worker: str) -> list[dict[str, Any]]:
    """The failures recorded when ``worker``'s tasks were taken from it: why, and when
    (database time). Read after the fact: the reaper can be quicker than any query before."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT f FROM hashmesh_tasks, jsonb_array_elements(failures) AS f "
            "WHERE f ->> 'worker' = %s",
            (worker,),
        ).fetchall()
    return [r[0] for r in rows]


def wait_settled(dsn: str) -> None:
    """The reaper judges sessions only once the server has run SESSION_SETTLE_SECONDS."""

    def settled() -> bool:
        with psycopg.connect(dsn) as conn:
            row = conn.execute(
                "SELECT pg_postmaster_start_time() < now() - make_interval(secs => %s)",
                (SESSION_SETTLE_SECONDS,),
            ).fetchone()
        return bool(row and row[0])

    wait_for(settled, 30, "the server has run a few seconds")


def assert_all_done_once(dsn: str, n: int) -> None:
    wait_for(lambda: counts(dsn) == {"succeeded": n}, 90, f"all {n} tasks succeeded")
    assert written_more_than_once(dsn) == 0
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT min(completions) FROM hashmesh_tasks").fetchone() == (1,)


def test_sigkill_frees_a_workers_batch_in_seconds_not_a_lease(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn)
    submit_argon2(hashd.address, 60)
    wait_settled(dsn)
    victim = procs.workerd(
        dsn, "--name", "victim", "--concurrency", "30", "--cpu-workers", "1", env=LONG_LEASE
    )
    wait_for(lambda: counts(dsn).get("succeeded", 0) >= 2, 60, "the victim finished a few")
    procs.workerd(dsn, "--name", "rescuer", "--concurrency", "30", env=LONG_LEASE)
    victim.kill()
    killed_at = db_now(dsn)
    assert_all_done_once(dsn, 60)
    taken = taken_from(dsn, "victim")
    assert taken, "the victim held no claimed tasks when killed"
    for failure in taken:
        assert failure["error"] == "worker lost"
        failed_at = datetime.fromisoformat(failure["failed_at"])
        assert failed_at - killed_at < RESCUE_BOUND, "rescued by the session, not the lease"


def test_a_restarted_worker_does_not_wait_for_its_previous_self(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn)
    submit_argon2(hashd.address, 30)
    wait_settled(dsn)
    args = ("--name", "solo", "--concurrency", "30", "--cpu-workers", "1")
    first = procs.workerd(dsn, *args, env=LONG_LEASE)
    wait_for(lambda: counts(dsn).get("succeeded", 0) >= 2, 60, "the first run finished a few")
    first.kill()
    killed_at = db_now(dsn)
    assert held_by(dsn, "solo"), "nobody else runs: the killed worker's tasks wait"
    procs.workerd(dsn, *args, env=LONG_LEASE)  # what a supervisor does: same name, same flags
    assert_all_done_once(dsn, 30)
    taken = taken_from(dsn, "solo")
    assert taken
    for failure in taken:
        assert failure["error"] == "worker lost"
        assert datetime.fromisoformat(failure["failed_at"]) - killed_at < RESCUE_BOUND


def test_sigstop_is_caught_by_the_lease_and_the_late_writes_are_fenced(
    dsn: str, procs: Processes
) -> None:
    lease = 3.0
    short = {"HASHMESH_TASK_LEASE_SECONDS": str(lease), "HASHMESH_WORKERD_HEARTBEAT_SECONDS": "0.3"}
    hashd = procs.hashd(dsn)
    submit_argon2(hashd.address, 40)
    frozen = procs.workerd(
        dsn, "--name", "frozen", "--concurrency", "20", "--cpu-workers", "1", env=short
    )
    wait_for(lambda: counts(dsn).get("succeeded", 0) >= 2, 60, "the worker finished a few")
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        stopped_at = db_now(dsn)
        held = held_by(dsn, "frozen")
        assert held
        procs.workerd(dsn, "--name", "rescuer", "--concurrency", "20", env=short)
        wait_for(
            lambda: not set(held) & set(held_by(dsn, "frozen")), 60, "the frozen worker's tasks"
        )
    finally:
        os.kill(frozen.pid, signal.SIGCONT)  # it wakes up and tries to write: fenced
    assert_all_done_once(dsn, 40)
    taken = taken_from(dsn, "frozen")
    assert {f["error"] for f in taken} == {"lease expired"}  # its connection stayed open
    assert len(taken) >= len(held)
    for failure in taken:
        failed_at = datetime.fromisoformat(failure["failed_at"])
        assert failed_at - stopped_at < RESCUE_BOUND + timedelta(seconds=lease)
