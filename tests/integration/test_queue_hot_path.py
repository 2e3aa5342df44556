"""The hot path's plans, against a real PostgreSQL: workerd's statements reach the rows they
name through an index even on a table the planner has no statistics for (a new database),
after their plans were cached on an empty table; a claim reads the rows it claims, not the
whole primary key; and a lease exists only while a task runs,
which is what lets worker writes fence on the lease alone."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from hashmesh.core.queue import db
from hashmesh.core.queue.model import Completion, Failure, Lease, NewTask, TaskStatus
from hashmesh.core.queue.store import PostgresTaskStore
from hashmesh.core.settings import DatabaseSettings

READS = """SELECT coalesce(sum(seq_tup_read), 0) AS scanned FROM pg_stat_user_tables
           WHERE relname = 'hashmesh_tasks'"""
RUNNING_INDEX_READS = """SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
    WHERE indexrelname IN ('hashmesh_tasks_leases', 'hashmesh_tasks_unfinished')"""
KEY_READS = """SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes
    WHERE indexrelname = 'hashmesh_tasks_pkey'"""


def table_reads(dsn: str) -> tuple[int, int, int]:
    """(rows read by table scans of hashmesh_tasks, entries read from its running-rows indexes,
    entries read from its primary key)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        [(scanned,)] = conn.execute(READS).fetchall()
        [(running,)] = conn.execute(RUNNING_INDEX_READS).fetchall()
        [(keys,)] = conn.execute(KEY_READS).fetchall()
    return int(scanned), int(running), int(keys)


async def one_round(store: PostgresTaskStore, tag: str) -> None:
    """A task through every worker write: claim, renew, fail, claim again, complete."""
    await store.submit_many([NewTask("md5", tag.encode())])
    [first] = await store.claim("w", 1, lease_seconds=60)
    await store.heartbeat(
        "w", [Lease(first.id, first.lease_id)], lease_seconds=60, in_flight=1, processed=0
    )
    await store.fail_many([Failure(first.id, first.lease_id, "boom")], base=0.0, cap=0.0)
    [again] = await store.claim("w", 1, lease_seconds=60)
    assert await store.complete_many([Completion(again.id, again.lease_id, b"d", "64")])


def test_worker_statements_never_scan_the_table_on_a_new_database(dsn: str) -> None:
    """Plans cached while the table was empty (psycopg prepares a statement at its 5th run)
    would otherwise scan the whole table, or every running row, at every claim and write:
    table and running-index reads are counted by PostgreSQL, not timed."""
    settings = DatabaseSettings(dsn=dsn, pool_max=1)

    async def main() -> None:
        pool = db.make_pool(settings, name="test-worker", index_only_plans=True)
        await pool.open()
        store = PostgresTaskStore(pool)
        try:
            for i in range(8):  # prepared, and generic plans made, on an empty table
                await one_round(store, f"warm-{i}")
            await asyncio.to_thread(grow, dsn)
            before = table_reads(dsn)
            for i in range(20):
                await one_round(store, f"grown-{i}")
            async with pool.connection() as conn:  # this backend's counters, reported now
                await conn.execute("SELECT pg_stat_force_next_flush()")
                await conn.execute("SELECT 1")
            after = table_reads(dsn)
        finally:
            await pool.close()
        scanned, running = after[0] - before[0], after[1] - before[1]
        assert scanned == 0, f"worker statements read {scanned} rows by table scans"
        # 20 rounds among 3,000 running rows: a handful of entries each, not the 3,000.
        assert running < 1000, f"worker statements read {running} running-index entries"

    asyncio.run(main())


def grow(dsn: str) -> None:
    """20,000 finished and 3,000 running tasks, and no ANALYZE (as in a new database)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, finished_at, "
            "result_digest, result_encoded) "
            "SELECT 'md5', 'x', 1, 'succeeded', now(), 'd', '64' FROM generate_series(1, 20000)"
        )
        conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, worker, lease_id, "
            "lease_expires_at, started_at) SELECT 'md5', 'x', 1, 'running', 'other', "
            "nextval('hashmesh_lease_seq'), now() + interval '1 hour', now() "
            "FROM generate_series(1, 3000)"
        )


@pytest.mark.parametrize("status", [s.value for s in TaskStatus if s is not TaskStatus.RUNNING])
def test_a_lease_exists_only_while_a_task_runs(dsn: str, status: str) -> None:
    row: dict[str, Any] = {"status": status}
    with psycopg.connect(dsn, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.CheckViolation, match="lease_only_running"):
            conn.execute(
                "INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, lease_id) "
                "VALUES ('md5', NULL, 1, %(status)s, 1)",
                row,
            )
        # Ending a run clears the lease in the same statement, so the rule never gets in the
        # way of a transition.
        [(task_id,)] = conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, lease_id) "
            "VALUES ('md5', 'x', 1, 'running', 7) RETURNING id"
        ).fetchall()
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute(
                "UPDATE hashmesh_tasks SET status = %(status)s WHERE id = %(id)s",
                {**row, "id": task_id},
            )


def test_a_claim_reads_the_rows_it_claims_not_the_primary_key(dsn: str) -> None:
    """A worker claims up to its free slots (128): joined to rows the planner could only count
    from that LIMIT, the claim's update hash-joined a scan of the whole primary key on a table
    of a few thousand analyzed rows, at every claim. Entries read are counted by PostgreSQL."""
    settings = DatabaseSettings(dsn=dsn, pool_max=1)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size, status, finished_at, "
            "result_digest, result_encoded) "
            "SELECT 'md5', 'x', 1, 'succeeded', now(), 'd', '64' FROM generate_series(1, 3000)"
        )
        conn.execute("ANALYZE hashmesh_tasks")

    async def main() -> int:
        pool = db.make_pool(settings, name="test-worker", index_only_plans=True)
        await pool.open()
        store = PostgresTaskStore(pool)
        try:
            before = table_reads(dsn)
            for i in range(10):  # past psycopg's prepare threshold: the generic plan too
                await store.submit_many([NewTask("md5", f"t-{i}".encode())])
                [task] = await store.claim("w", 128, lease_seconds=60)
                assert await store.complete_many([Completion(task.id, task.lease_id, b"d", "64")])
            async with pool.connection() as conn:
                await conn.execute("SELECT pg_stat_force_next_flush()")
                await conn.execute("SELECT 1")
            return table_reads(dsn)[2] - before[2]
        finally:
            await pool.close()

    keys = asyncio.run(main())
    assert keys < 300, f"10 claims and completions read {keys} primary-key entries of 3,000 rows"
