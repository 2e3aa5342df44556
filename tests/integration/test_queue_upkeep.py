"""The queue as it ages, against a real PostgreSQL: counters that equal a real count through
every transition, retention that deletes exactly what is due, worker sessions that make a dead
worker's tasks claimable again at once, and worker writes that skip the WAL flush wait."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
import pytest
from psycopg.rows import dict_row

from hashmesh.core.queue import db
from hashmesh.core.queue.limits import task_cost
from hashmesh.core.queue.model import Completion, Failure, Lease, NewTask, TaskStatus
from hashmesh.core.queue.retention import RetentionPolicy
from hashmesh.core.queue.sealing import TaskKeyring
from hashmesh.core.queue.store import (
    NOTIFY_READY,
    PRUNER_LOCK,
    SESSION_SETTLE_SECONDS,
    Listener,
    PostgresTaskStore,
    queries,
)
from hashmesh.core.settings import DatabaseSettings

T = TypeVar("T")
DAY = 86400.0
ARGON2 = {"time_cost": 2, "memory_cost_kib": 1024, "parallelism": 1, "hash_len": 32}


def with_store(dsn: str, body: Callable[[PostgresTaskStore], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = db.make_pool(DatabaseSettings(dsn=dsn, pool_max=4), name="test")
        await pool.open()
        try:
            return await body(PostgresTaskStore(pool, keyring=TaskKeyring.from_env()))
        finally:
            await pool.close()

    return asyncio.run(main())


def real_counts(dsn: str) -> tuple[dict[str, int], dict[str, int]]:
    """(tasks by status, unfinished tasks by client) by scanning the table."""
    with psycopg.connect(dsn) as conn:
        by_status = dict(
            conn.execute("SELECT status, count(*) FROM hashmesh_tasks GROUP BY 1").fetchall()
        )
        by_client = dict(
            conn.execute(
                "SELECT client_id, count(*) FROM hashmesh_tasks "
                "WHERE status IN ('pending', 'retrying', 'running') GROUP BY 1"
            ).fetchall()
        )
    return by_status, by_client


def real_costs(dsn: str) -> dict[str, int]:
    """Queued work per client, by core.tasks.limits.task_cost over the unfinished rows."""
    costs: dict[str, int] = {}
    with psycopg.connect(dsn) as conn:
        for client_id, algorithm, params, size in conn.execute(
            "SELECT client_id, algorithm, params, input_size FROM hashmesh_tasks "
            "WHERE status IN ('pending', 'retrying', 'running')"
        ).fetchall():
            costs[client_id] = costs.get(client_id, 0) + task_cost(algorithm, params, size)
    return costs


def real_finished_last_minute(dsn: str) -> int:
    """Tasks that reached a final status in the last minute, by scanning the table."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT count(*) FROM hashmesh_tasks WHERE status IN ('succeeded', 'dead_letter') "
            "AND finished_at > now() - interval '60 seconds'"
        ).fetchone()
    assert row is not None
    return int(row[0])


async def assert_counters_match(
    store: PostgresTaskStore, dsn: str, step: str, *, recent: bool = False
) -> None:
    by_status, by_client = real_counts(dsn)
    stats = await store.stats(alive_seconds=30)
    counted = {s.value: n for s, n in stats.counts.items() if n}
    assert counted == by_status, f"after {step}"
    if recent:  # tasks the test finished within the minute (no finished_at backdated)
        assert stats.completed_last_minute == real_finished_last_minute(dsn), f"after {step}"
    assert await store.unfinished_by_client() == by_client, f"after {step}"
    assert await store.unfinished_cost_by_client() == real_costs(dsn), f"after {step}"


def backdate(dsn: str, ids: list[str], days: float) -> None:
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE hashmesh_tasks SET finished_at = finished_at - %s WHERE id = ANY(%s::uuid[])",
            (timedelta(days=days), ids),
        )


def test_counters_equal_a_real_count_through_every_transition(dsn: str) -> None:
    async def body(store: PostgresTaskStore) -> None:
        await assert_counters_match(store, dsn, "nothing", recent=True)
        submitted = await store.submit_many(
            [NewTask("md5", b"t-%d" % i, client_id=f"c{i % 3}", max_attempts=1) for i in range(40)]
            + [NewTask("md5", b"cached", cached_result=(b"\x01" * 16, "01" * 16))]
            + [
                NewTask("argon2id", b"pw-%d" % i, client_id="c1", params=ARGON2, max_attempts=1)
                for i in range(3)
            ]
        )
        ids = [s.task.id for s in submitted]
        await assert_counters_match(store, dsn, "submit", recent=True)
        claimed = await store.claim("w", 30, 30)
        await assert_counters_match(store, dsn, "claim", recent=True)
        done = [Completion(t.id, t.lease_id, b"\x00" * 16, "00" * 16) for t in claimed[:10]]
        assert len(await store.complete_many(done)) == 10
        await assert_counters_match(store, dsn, "complete", recent=True)
        failed = [Failure(t.id, t.lease_id, "ValueError: no") for t in claimed[10:15]]
        assert set((await store.fail_many(failed, base=0, cap=0)).values()) == {
            TaskStatus.DEAD_LETTER
        }
        await assert_counters_match(store, dsn, "fail", recent=True)
        assert len(await store.release([Lease(t.id, t.lease_id) for t in claimed[15:20]])) == 5
        await assert_counters_match(store, dsn, "release", recent=True)
        unclaimed = [i for i in ids[:40] if i not in {t.id for t in claimed}]
        await store.cancel(claimed[20].id, owner=None)  # running: flagged only
        await store.cancel(unclaimed[0], owner=None)  # pending: cancelled at once
        assert await store.acknowledge_cancel([Lease(claimed[20].id, claimed[20].lease_id)])
        await assert_counters_match(store, dsn, "cancel", recent=True)
        # A digest dead letter: an argon2 one has its input erased and cannot be requeued (the
        # claim order among tasks submitted in the same millisecond is not fixed).
        dead_digest = next(t for t in claimed[10:15] if t.algorithm == "md5")
        await store.requeue(dead_digest.id, owner=None)
        await assert_counters_match(store, dsn, "requeue")
        # The requeued dead letter did reach a final status within the minute: still counted.
        finished = (await store.stats(alive_seconds=30)).completed_last_minute
        assert finished == real_finished_last_minute(dsn) + 1
        assert finished == 1 + 10 + 5  # the cached one, the completed, the dead letters
        backdate(dsn, ids, days=30)  # rewrites history: the ring still counts what it saw
        run = await store.prune(RetentionPolicy().ages, batch=3)
        assert run is not None and run.total > 0
        await assert_counters_match(store, dsn, "prune")
        assert (await store.stats(alive_seconds=30)).completed_last_minute == finished
        with psycopg.connect(dsn) as conn:  # slots folded into one row per status
            slots = conn.execute(
                "SELECT count(*) FROM hashmesh_task_counts WHERE slot <> 0"
            ).fetchone()
        assert slots == (0,)

    with_store(dsn, body)


def test_counters_stay_right_under_concurrent_writers(dsn: str) -> None:
    """Many connections at once (different slots, same rows): no change lost, no deadlock."""

    async def body(store: PostgresTaskStore) -> None:
        await store.submit_many([NewTask("md5", b"x-%d" % i) for i in range(400)])

        async def worker(name: str) -> None:
            while claimed := await store.claim(name, 7, 30):
                await store.complete_many(
                    [Completion(t.id, t.lease_id, b"\x00" * 16, "00" * 16) for t in claimed]
                )

        async def submitter() -> None:
            for i in range(20):
                await store.submit_many([NewTask("md5", b"y-%d-%d" % (i, j)) for j in range(5)])

        await asyncio.gather(*(worker(f"w{i}") for i in range(4)), submitter())
        await assert_counters_match(store, dsn, "concurrent writers")

    with_store(dsn, body)


def test_retention_deletes_exactly_what_is_due_while_workers_run(dsn: str) -> None:
    policy = RetentionPolicy(
        succeeded_seconds=DAY, cancelled_seconds=2 * DAY, dead_letter_seconds=7 * DAY
    )

    async def body(store: PostgresTaskStore) -> None:
        old = await store.submit_many(
            [NewTask("md5", b"old-%d" % i, max_attempts=1) for i in range(30)]
        )
        claimed = await store.claim("w", 30, 30)
        await store.complete_many(
            [Completion(t.id, t.lease_id, b"\x00" * 16, "00" * 16) for t in claimed[:10]]
        )
        await store.fail_many(
            [Failure(t.id, t.lease_id, "E: x") for t in claimed[10:20]], base=0, cap=0
        )
        await store.release([Lease(t.id, t.lease_id) for t in claimed[20:]])
        for t in claimed[20:]:
            await store.cancel(t.id, owner=None)
        ids = [s.task.id for s in old]
        succeeded = [t.id for t in claimed[:10]]
        others = [t.id for t in claimed[10:]]  # dead letters and cancelled
        # 1.5 days old: succeeded are due, cancelled (2 d) and dead letters (7 d) are not.
        backdate(dsn, ids, days=1.5)
        preview = await store.prune_preview(policy.ages)
        assert preview == {
            TaskStatus.SUCCEEDED: 10,
            TaskStatus.CANCELLED: 0,
            TaskStatus.DEAD_LETTER: 0,
        }
        # Meanwhile new work is submitted, claimed and finished: none of it is touched.
        fresh = await store.submit_many([NewTask("md5", b"new-%d" % i) for i in range(20)])
        running = await store.claim("w2", 5, 30)
        run, _ = await asyncio.gather(
            store.prune(policy.ages, batch=4),
            store.complete_many(
                [Completion(t.id, t.lease_id, b"\x00" * 16, "00" * 16) for t in running]
            ),
        )
        assert run is not None and run.deleted[TaskStatus.SUCCEEDED] == 10
        assert run.batches >= 3  # 10 rows in batches of 4, then the other statuses
        remaining = {t.id for t in await store.get_many(ids + [s.task.id for s in fresh])}
        assert remaining == set(others) | {s.task.id for s in fresh}
        assert not remaining & set(succeeded)
        # 8 days: everything old is due now; fresh tasks (finished just now) still are not.
        backdate(dsn, others, days=6.5)
        run = await store.prune(policy.ages, batch=1000)
        assert run is not None
        assert run.deleted == {
            TaskStatus.SUCCEEDED: 0,
            TaskStatus.CANCELLED: 10,
            TaskStatus.DEAD_LETTER: 10,
        }
        assert {t.id for t in await store.get_many(ids)} == set()
        assert len(await store.get_many([s.task.id for s in fresh])) == 20
        await assert_counters_match(store, dsn, "prune")

    with_store(dsn, body)


def test_one_pruner_at_a_time(dsn: str) -> None:
    """While another process holds the pruner's lock, a run deletes nothing and says so."""

    async def body(store: PostgresTaskStore) -> None:
        [task] = await store.submit_many([NewTask("md5", b"a", cached_result=(b"\x00", "00"))])
        backdate(dsn, [task.task.id], days=3)
        with psycopg.connect(dsn, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", PRUNER_LOCK)
            assert await store.prune(RetentionPolicy().ages, batch=10) is None
            assert len(await store.get_many([task.task.id])) == 1
            holder.execute("SELECT pg_advisory_unlock(%s, %s)", PRUNER_LOCK)
        run = await store.prune(RetentionPolicy().ages, batch=10)
        assert run is not None and run.total == 1

    with_store(dsn, body)


def wait_settled(dsn: str) -> None:
    """Sessions are judged only once the server has run a few seconds (see `reclaim_lost`)."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute(
            "SELECT extract(epoch FROM now() - pg_postmaster_start_time())"
        ).fetchone()
    assert row is not None
    time.sleep(max(0.0, SESSION_SETTLE_SECONDS + 0.2 - float(row[0])))


def test_a_closed_session_frees_its_tasks_at_once_and_fencing_holds(dsn: str) -> None:
    wait_settled(dsn)

    async def body(store: PostgresTaskStore) -> None:
        await store.submit_many([NewTask("md5", b"s-%d" % i) for i in range(4)])
        alive = Listener(dsn, [NOTIFY_READY], name="alive", hold_session=True)
        doomed = Listener(dsn, [NOTIFY_READY], name="doomed", hold_session=True)
        await alive.connect()
        await doomed.connect()
        assert alive.session and doomed.session and alive.session != doomed.session
        mine = await store.claim("alive", 2, lease_seconds=600, session=alive.session)
        lost = await store.claim("doomed", 2, lease_seconds=600, session=doomed.session)
        assert await store.reclaim_lost() == 0  # both sessions live, leases long
        await doomed.close()
        reclaimed = 0
        for _ in range(100):  # the backend exits a moment after its client closes
            reclaimed += await store.reclaim_lost()
            if reclaimed == 2:
                break
            await asyncio.sleep(0.05)
        assert reclaimed == 2
        records = {t.id: t for t in await store.get_many([t.id for t in mine + lost])}
        assert {records[t.id].status for t in lost} == {TaskStatus.RETRYING}
        assert all("lost its database session" in (records[t.id].last_error or "") for t in lost)
        assert {records[t.id].status for t in mine} == {TaskStatus.RUNNING}
        # The lost holder's late result is refused; the next claimant's is written once.
        late = [Completion(t.id, t.lease_id, b"\x00" * 16, "00" * 16) for t in lost]
        assert await store.complete_many(late) == set()
        again = await store.claim("alive", 10, 600, session=alive.session)
        assert {t.id for t in again} == {t.id for t in lost}
        await alive.close()

    with_store(dsn, body)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT max(completions) FROM hashmesh_tasks").fetchone() == (0,)


def test_worker_writes_commit_asynchronously_and_submissions_do_not(dsn: str) -> None:
    """`async_commit` turns synchronous_commit off for the statement's own transaction only."""
    claim: dict[str, Any] = {"worker": "w", "limit": 1, "lease_seconds": 30, "session": None}
    with psycopg.connect(dsn) as conn:  # a transaction block: SHOW sees the local setting
        conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size) VALUES ('md5', 'a', 1)"
        )
        conn.commit()
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        row = conn.cursor(row_factory=dict_row).execute(queries()["claim"], claim).fetchone()
        assert row is not None
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        conn.commit()
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        result = {
            "id": str(row["id"]),
            "lease_id": row["lease_id"],
            "digest": "\\x00",
            "encoded": "00",
        }
        done = {"rows": json.dumps([result])}
        assert conn.execute(queries()["complete"], done).fetchone() is not None
        assert conn.execute("SHOW synchronous_commit").fetchone() == ("off",)
        conn.commit()
        assert "synchronous_commit" not in queries()["submit"]
        assert "synchronous_commit" not in queries()["cancel"]


@pytest.mark.parametrize("statuses", [("succeeded",), ()])
def test_dry_run_preview_matches_the_run(dsn: str, statuses: tuple[str, ...]) -> None:
    async def body(store: PostgresTaskStore) -> None:
        done = await store.submit_many(
            [NewTask("md5", b"p-%d" % i, cached_result=(b"\x00", "00")) for i in range(7)]
        )
        if statuses:
            backdate(dsn, [s.task.id for s in done[:5]], days=2)
        policy = RetentionPolicy()
        preview = await store.prune_preview(policy.ages)
        run = await store.prune(policy.ages, batch=2)
        assert run is not None and run.deleted == preview
        assert run.total == (5 if statuses else 0)

    with_store(dsn, body)


def test_hashctl_task_prune_dry_run_then_for_real(dsn: str) -> None:
    from tests.cli_helpers import hashctl, hashctl_json

    async def submit(store: PostgresTaskStore) -> list[str]:
        done = await store.submit_many(
            [NewTask("md5", b"h-%d" % i, cached_result=(b"\x00", "00")) for i in range(5)]
        )
        return [s.task.id for s in done]

    ids = with_store(dsn, submit)
    backdate(dsn, ids[:3], days=2)
    preview = hashctl_json("task", "prune", "--dry-run", "--dsn", dsn)
    assert preview["dry_run"] and preview["total"] == 3
    assert {r["status"]: r["count"] for r in preview["statuses"]}["succeeded"] == 3
    assert len(with_store(dsn, lambda store: store.get_many(ids))) == 5  # nothing deleted
    done = hashctl_json("task", "prune", "--dsn", dsn)
    assert done["total"] == 3 and not done["skipped"]
    assert {t.id for t in with_store(dsn, lambda store: store.get_many(ids))} == set(ids[3:])
    table = hashctl("task", "prune", "--dry-run", "--dsn", dsn)
    assert table.exit_code == 0 and "would delete 0 finished tasks" in table.stdout
    unset = hashctl("task", "prune", env={"HASHMESH_DATABASE_URL": ""})
    assert unset.exit_code != 0 and "no database" in unset.stderr


def test_a_claim_does_not_read_the_scheduled_backlog(dsn: str) -> None:
    """50,000 tasks scheduled for tomorrow and one due now at each of three priorities: the
    claim reads a few index pages per priority, not the backlog (counted in buffers, which do
    not depend on the machine's speed)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size, priority, run_after) "
            "SELECT 'md5', 'x', 1, g % 3, now() + interval '1 day' FROM generate_series(1, 50000) g"
        )
        conn.execute(
            "INSERT INTO hashmesh_tasks (algorithm, input, input_size, priority) "
            "SELECT 'md5', 'due', 3, g FROM generate_series(0, 2) g"
        )
        conn.execute("VACUUM ANALYZE hashmesh_tasks")
        params = {"worker": "w", "limit": 10, "lease_seconds": 30, "session": None}
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS, FORMAT TEXT) " + queries()["claim"], params
            ).fetchall()
        )
        claimed = conn.execute(
            "SELECT priority FROM hashmesh_tasks WHERE status = 'running' ORDER BY priority"
        ).fetchall()
    assert claimed == [(0,), (1,), (2,)]  # all three due tasks, none of the scheduled ones
    [total] = [line for line in plan.splitlines() if "Buffers" in line][:1]
    pages = sum(int(n) for n in re.findall(r"(?:hit|read)=(\d+)", total))
    # Measured: ~110 pages whatever the backlog; one range over the whole index: ~970 at 50,000.
    assert pages < 400, plan


def test_a_pruner_cancelled_mid_run_leaves_no_lock_behind(dsn: str) -> None:
    """Shutdown cancels a run between batches: the pooled connection that held the pruner's
    session lock is closed, so the next run (this process or another) is not locked out."""

    async def body(store: PostgresTaskStore) -> None:
        done = await store.submit_many(
            [NewTask("md5", b"c-%d" % i, cached_result=(b"\x00", "00")) for i in range(400)]
        )
        backdate(dsn, [s.task.id for s in done], days=2)
        running = asyncio.create_task(store.prune(RetentionPolicy().ages, batch=1))
        for _ in range(400):  # wait for the state: some rows gone, not all
            await asyncio.sleep(0.02)
            if len(await store.get_many([s.task.id for s in done])) < 400:
                break
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        with psycopg.connect(dsn, autocommit=True) as other:
            got = other.execute("SELECT pg_try_advisory_lock(%s, %s)", PRUNER_LOCK).fetchone()
            assert got == (True,)
            other.execute("SELECT pg_advisory_unlock(%s, %s)", PRUNER_LOCK)
        rest = await store.prune(RetentionPolicy().ages, batch=1000)
        assert rest is not None
        assert await store.get_many([s.task.id for s in done]) == []
        await assert_counters_match(store, dsn, "cancelled prune")

    with_store(dsn, body)


def test_completed_last_minute_forgets_a_second_when_its_bucket_comes_round_again(
    dsn: str,
) -> None:
    """The ring of 64 one-second buckets: a bucket last written 64 s ago is reset, not added
    to, by the next task finishing in its ring position, and is outside the minute read."""

    async def body(store: PostgresTaskStore) -> None:
        await store.submit_many([NewTask("md5", b"ring-%d" % i, max_attempts=1) for i in range(4)])
        claimed = await store.claim("w", 4, 30)
        done = [Completion(t.id, t.lease_id, b"\x00" * 16, "00" * 16) for t in claimed[:3]]
        assert len(await store.complete_many(done)) == 3
        before = (await store.stats(alive_seconds=30)).completed_last_minute
        assert before >= 3
        with psycopg.connect(dsn) as conn:  # as if every bucket had been written 64 s ago
            conn.execute("UPDATE hashmesh_task_finished SET second = second - 64")
        assert (await store.stats(alive_seconds=30)).completed_last_minute == 0
        last = claimed[3]
        assert await store.complete_many([Completion(last.id, last.lease_id, b"\x00" * 16, "")])
        assert (await store.stats(alive_seconds=30)).completed_last_minute == 1
        with psycopg.connect(dsn) as conn:
            rows = conn.execute("SELECT count(*) FROM hashmesh_task_finished").fetchone()
        assert rows is not None and rows[0] <= 64 * 16

    with_store(dsn, body)
