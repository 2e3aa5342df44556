"""The queue's rules on the in-memory store, and TaskService / WatchTask on top of it
(no sockets). The same rules are checked on PostgreSQL in tests/integration/test_tasks.py."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import pytest

from hashmesh.core.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from hashmesh.core.identity import Caller
from hashmesh.core.tasks.memory import MemoryTaskStore
from hashmesh.core.tasks.model import Completion, Failure, Lease, NewTask, TaskStatus
from hashmesh.hashd.config import HashdSettings
from hashmesh.hashd.identity import acting_as
from hashmesh.hashd.task_service import TaskService
from hashmesh.hashd.watch import WatchHub
from hashmesh.v1 import common_pb2, task_pb2

T = TypeVar("T")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Context:
    """Stands for grpc.aio.ServicerContext: TaskService reads the caller from
    ``hashmesh.hashd.identity``, not from the context."""


META_CLIENT = Caller("meta-client")


def run(body: Callable[[], Awaitable[T]], caller: Caller = META_CLIENT) -> T:
    async def as_caller() -> T:
        with acting_as(caller):
            return await body()

    return asyncio.run(as_caller())


def test_retries_back_off_then_dead_letter_and_fencing_holds() -> None:
    clock = Clock()
    store = MemoryTaskStore(clock)

    async def body() -> None:
        [sub] = await store.submit_many([NewTask("md5", b"x", max_attempts=3)])
        for attempt in (1, 2, 3):
            [task] = await store.claim("w", 10, 30)
            assert task.attempts == attempt
            status = await store.fail_many(
                [Failure(task.id, task.lease_id, "boom")], base=1.0, cap=3.0
            )
            assert not await store.complete(task.id, task.lease_id, b"late", "6c")  # fenced
            if attempt < 3:
                assert status == {task.id: TaskStatus.RETRYING}
                assert await store.claim("w", 10, 30) == []  # not due yet
                wait = await store.next_due()
                assert wait is not None and 0.5 * min(3.0, 2 ** (attempt - 1)) <= wait <= min(
                    3.0, 2 ** (attempt - 1)
                )
                clock.advance(wait)
        final = await store.get(sub.task.id, owner=None)
        assert final.status is TaskStatus.DEAD_LETTER and final.last_error == "boom"
        assert [f["attempt"] for f in store.failures(final.id)] == [1, 2, 3]
        assert store.completions(final.id) == 0
        assert (await store.requeue(final.id, owner=None)).status is TaskStatus.PENDING

    run(body)


def test_expired_lease_is_reclaimed_and_late_result_refused() -> None:
    clock = Clock()
    store = MemoryTaskStore(clock)

    async def body() -> None:
        await store.submit_many([NewTask("argon2id", b"secret", params={})])
        [first] = await store.claim("a", 10, 5)
        clock.advance(6)
        assert await store.reclaim_expired() == 1
        [second] = await store.claim("b", 10, 5)
        assert await store.heartbeat("a", [Lease(first.id, first.lease_id)], lease_seconds=5,
                                     in_flight=1, processed=0) == {}  # fmt: skip
        assert (
            await store.complete_many([Completion(first.id, first.lease_id, b"a", "61")]) == set()
        )
        assert await store.complete_many([Completion(second.id, second.lease_id, b"b", "62")]) == {
            second.id
        }
        assert store.completions(second.id) == 1
        assert store._rows[second.id].input is None  # argon2 input erased when final

    run(body)


def test_service_submits_validates_limits_and_lists() -> None:
    store = MemoryTaskStore()
    service = TaskService(store, HashdSettings(max_pending_tasks=3, max_pending_per_client=2))
    spec = task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"a", idempotency_key="k")

    async def body() -> None:
        first = await service.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), Context())  # type: ignore[arg-type]
        again = await service.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), Context())  # type: ignore[arg-type]
        assert first.created and not again.created and first.task.id == again.task.id
        assert first.task.client_id == "meta-client"
        with pytest.raises(InvalidArgument):
            await service.SubmitTasks(task_pb2.SubmitTasksRequest(), Context())  # type: ignore[arg-type]
        with pytest.raises(ResourceExhausted):  # 1 + 2 > 2 for this client: refused whole
            await service.SubmitTasks(task_pb2.SubmitTasksRequest(specs=[spec, spec]), Context())  # type: ignore[arg-type]
        listed = await service.ListTasks(task_pb2.ListTasksRequest(), Context())  # type: ignore[arg-type]
        assert [t.id for t in listed.tasks] == [first.task.id]
        cancelled = await service.CancelTask(
            task_pb2.CancelTaskRequest(id=first.task.id), Context()
        )  # type: ignore[arg-type]
        assert cancelled.task.status == task_pb2.TASK_STATUS_CANCELLED
        with pytest.raises(FailedPrecondition):
            await service.CancelTask(task_pb2.CancelTaskRequest(id=first.task.id), Context())  # type: ignore[arg-type]

    run(body)


def test_watch_streams_each_change_from_the_hub_until_final() -> None:
    store = MemoryTaskStore()
    hub = WatchHub("postgresql://unused", store)  # not started: changes are pushed by hand
    service = TaskService(store, HashdSettings(), hub=hub)

    async def body() -> list[Any]:
        [sub] = await store.submit_many([NewTask("md5", b"x")])
        seen: list[Any] = []

        async def watch() -> None:
            stream = service.WatchTask(task_pb2.WatchTaskRequest(id=sub.task.id), Context())  # type: ignore[arg-type]
            async for message in stream:
                seen.append(message.task.status)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.01)
        [task] = await store.claim("w", 1, 30)
        await store.complete_many([Completion(task.id, task.lease_id, b"d", "64")])
        # Both changes are announced together, after both happened: RUNNING is still streamed.
        await hub._dispatch([(task.id, TaskStatus.RUNNING), (task.id, TaskStatus.SUCCEEDED)])
        await asyncio.wait_for(watcher, 5)
        assert hub.watchers == 0
        return seen

    assert run(body, Caller("anonymous")) == [
        task_pb2.TASK_STATUS_PENDING,
        task_pb2.TASK_STATUS_RUNNING,
        task_pb2.TASK_STATUS_SUCCEEDED,
    ]
