"""The real ``Worker`` loop on the in-memory store (no database, no sockets): claims, write-back,
retries and dead letters, cancellation, lost sessions and fenced results, heartbeats, shutdown.
The same worker runs on PostgreSQL in tests/integration/test_workerd.py and the fault tests."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest

from hashmesh.core.hashing.algorithms import Argon2Params
from hashmesh.core.queue.memory import MemoryListener, MemoryTaskStore
from hashmesh.core.queue.model import NewTask, TaskStatus
from hashmesh.core.settings import DatabaseSettings
from hashmesh.workerd.config import WorkerSettings
from hashmesh.workerd.worker import Worker

T = TypeVar("T")
STATE_TIMEOUT = 30.0
"""Generous: the states are awaited, never timed; a loaded machine only makes them later."""
# Heavy enough that a task is still held while the test acts on it (the property checked
# holds either way: it only decides which path a test exercises).
SLOW_ARGON2 = Argon2Params.build(time_cost=3, memory_cost_kib=64 * 1024, parallelism=1,
                                 hash_len=32, salt=b"worker-unit-salt").to_json()  # fmt: skip


def settings(name: str = "w-unit", **overrides: object) -> WorkerSettings:
    base: dict[str, object] = {
        "database": DatabaseSettings(dsn="postgresql://unused.invalid/none"),
        "name": name,
        "concurrency": 8,
        "cpu_workers": 1,
        "lease_seconds": 30.0,
        "reap_seconds": 0.05,
        "heartbeat_seconds": 0.05,
        "poll_seconds": 0.05,
        "retry_base": 0.0,
        "retry_cap": 0.0,
        "grace_seconds": 5.0,
    }
    base.update(overrides)
    return WorkerSettings(**base)  # type: ignore[arg-type]


def worker_on(store: MemoryTaskStore, config: WorkerSettings) -> Worker:
    return Worker(config, store=store, listener=MemoryListener(store))


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait for a state (never for a duration)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STATE_TIMEOUT
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.01)


class Running:
    """A worker's ``run(stop)`` as a task; ``stop()`` sets the event and waits for the end."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.event = asyncio.Event()
        self.ready = asyncio.Event()
        self.task = asyncio.create_task(worker.run(self.event, on_ready=self.ready.set))

    async def stop(self) -> None:
        self.event.set()
        await asyncio.wait_for(self.task, STATE_TIMEOUT)


def status_is(
    store: MemoryTaskStore, task_id: str, *wanted: TaskStatus
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return (await store.get(task_id, owner=None)).status in wanted

    return check


def test_worker_claims_runs_and_writes_each_task_back_once() -> None:
    async def body() -> None:
        store = MemoryTaskStore()
        texts = [f"text-{i}".encode() for i in range(20)]
        submitted = await store.submit_many([NewTask("sha256", t) for t in texts])
        running = Running(worker_on(store, settings()))
        for sub in submitted:
            await until(status_is(store, sub.task.id, TaskStatus.SUCCEEDED), "every task succeeded")
        await running.stop()
        for text, sub in zip(texts, submitted, strict=True):
            record = await store.get(sub.task.id, owner=None)
            assert record.result_digest == hashlib.sha256(text).digest()
            assert record.attempts == 1 and store.completions(sub.task.id) == 1
        assert running.worker.counters.processed == len(texts)

    asyncio.run(body())


def test_a_task_submitted_while_idle_is_claimed_on_its_announcement() -> None:
    async def body() -> None:
        store = MemoryTaskStore()
        # A safety poll far beyond the test's patience: only the NOTIFY stand-in can wake it.
        running = Running(worker_on(store, settings(poll_seconds=3600.0)))
        await asyncio.wait_for(running.ready.wait(), STATE_TIMEOUT)
        [sub] = await store.submit_many([NewTask("md5", b"wake up")])
        await until(status_is(store, sub.task.id, TaskStatus.SUCCEEDED), "the task succeeded")
        await running.stop()

    asyncio.run(body())


def test_failing_attempts_are_retried_then_dead_lettered() -> None:
    async def body() -> None:
        store = MemoryTaskStore()
        [sub] = await store.submit_many([NewTask("sha1", b"always fails", max_attempts=3)])
        [ok] = await store.submit_many([NewTask("md5", b"fine")])
        running = Running(worker_on(store, settings(fail_algorithms=("sha1",))))
        await until(status_is(store, sub.task.id, TaskStatus.DEAD_LETTER), "dead-lettered")
        await until(status_is(store, ok.task.id, TaskStatus.SUCCEEDED), "the other succeeded")
        await running.stop()
        record = await store.get(sub.task.id, owner=None)
        assert record.attempts == 3 and record.last_error
        assert [f["attempt"] for f in store.failures(sub.task.id)] == [1, 2, 3]
        assert store.completions(sub.task.id) == 0

    asyncio.run(body())


def test_a_task_cancelled_after_its_claim_ends_cancelled_without_a_result() -> None:
    async def body() -> None:
        store = MemoryTaskStore()
        # One CPU thread: the second argon2 task waits behind the first while held.
        first, second = await store.submit_many(
            [
                NewTask("argon2id", b"pw-1", params=SLOW_ARGON2),
                NewTask("argon2id", b"pw-2", params=SLOW_ARGON2),
            ]
        )
        running = Running(worker_on(store, settings()))
        await until(status_is(store, second.task.id, TaskStatus.RUNNING), "the second is claimed")
        await store.cancel(second.task.id, owner=None)
        await until(status_is(store, second.task.id, TaskStatus.CANCELLED), "cancelled")
        await until(status_is(store, first.task.id, TaskStatus.SUCCEEDED), "the first succeeded")
        await running.stop()
        record = await store.get(second.task.id, owner=None)
        assert record.result_digest is None and store.completions(second.task.id) == 0

    asyncio.run(body())


def test_heartbeats_renew_the_leases_of_held_tasks() -> None:
    async def body() -> None:
        now = [datetime(2026, 1, 1, tzinfo=UTC)]
        store = MemoryTaskStore(lambda: now[0])
        tasks = await store.submit_many(
            [NewTask("argon2id", f"pw-{i}".encode(), params=SLOW_ARGON2) for i in range(8)]
        )
        running = Running(worker_on(store, settings(lease_seconds=30.0)))
        last = tasks[-1].task.id
        await until(status_is(store, last, TaskStatus.RUNNING, TaskStatus.SUCCEEDED), "claimed")
        claimed_at = now[0]
        # Past the first lease's end on the store's clock: only renewals keep the tasks held.
        now[0] = claimed_at + timedelta(seconds=20)

        async def renewed() -> bool:
            expiries = store.lease_expiries()  # the tasks still held (some are done by now)
            return bool(expiries) and all(
                at > claimed_at + timedelta(seconds=30) for at in expiries.values()
            )

        await until(renewed, "every held lease was renewed")
        now[0] = claimed_at + timedelta(seconds=45)
        assert await store.reclaim_lost() == 0  # renewed leases are not lost
        for sub in tasks:
            await until(status_is(store, sub.task.id, TaskStatus.SUCCEEDED), "succeeded")
        await running.stop()
        assert all(store.completions(sub.task.id) == 1 for sub in tasks)

    asyncio.run(body())


def test_a_worker_that_lost_its_session_has_its_task_rescued_and_its_result_fenced() -> None:
    async def body() -> None:
        store = MemoryTaskStore()
        [sub] = await store.submit_many([NewTask("argon2id", b"pw", params=SLOW_ARGON2)])
        first = Running(worker_on(store, settings("w-first")))
        await until(status_is(store, sub.task.id, TaskStatus.RUNNING), "claimed by the first")
        first.worker.listener.drop()  # type: ignore[attr-defined]
        # Its connection gone, the first worker looks dead: the second one's reaper rescues it.
        second = Running(worker_on(store, settings("w-second")))
        await until(status_is(store, sub.task.id, TaskStatus.SUCCEEDED), "succeeded")
        await first.stop()
        await second.stop()
        assert store.completions(sub.task.id) == 1  # one result recorded, the other fenced

    asyncio.run(body())


def test_shutdown_hands_back_what_never_started_and_leaves_nothing_running() -> None:
    async def body() -> None:
        store = MemoryTaskStore()
        tasks = await store.submit_many(
            [NewTask("argon2id", f"pw-{i}".encode(), params=SLOW_ARGON2) for i in range(6)]
        )
        running = Running(worker_on(store, settings(grace_seconds=0.0)))
        await until(status_is(store, tasks[-1].task.id, TaskStatus.RUNNING), "all claimed")
        await running.stop()
        records = [await store.get(sub.task.id, owner=None) for sub in tasks]
        assert not [r for r in records if r.status is TaskStatus.RUNNING]
        for record in records:
            if record.status is TaskStatus.SUCCEEDED:
                assert store.completions(record.id) == 1
            else:  # handed back: waiting again, its attempt not counted
                assert record.status is TaskStatus.PENDING and record.attempts == 0
        assert any(r.status is TaskStatus.PENDING for r in records)
        [worker] = (await store.stats(alive_seconds=60)).workers
        assert not worker.alive

    asyncio.run(body())


def test_workerd_keeps_no_memory_tier_and_so_no_cache_listen_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # workerd only stores results in the cache: a memory tier would be memory nobody reads,
    # and its LISTEN connection one more backend PostgreSQL wakes at every notifying commit.
    monkeypatch.setenv("HASHMESH_CACHE_MEMORY_ENTRIES", "5000")  # what hashd is given

    async def build() -> Worker:
        dsn = "postgresql://nobody@127.0.0.1:1/none"  # never connected: no I/O in on_postgres
        return Worker.on_postgres(settings(database=DatabaseSettings(dsn=dsn)))

    worker = asyncio.run(build())
    assert worker.cache is not None
    assert worker.cache.settings.memory_entries == 0
