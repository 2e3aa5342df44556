"""TaskService and the task store against a real PostgreSQL and a real hashd process."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import grpc
import psycopg
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.core.queue import db
from hashmesh.core.queue.model import Completion, Lease, NewTask, TaskStatus
from hashmesh.core.queue.sealing import TaskKeyring
from hashmesh.core.queue.store import PostgresTaskStore
from hashmesh.core.settings import DatabaseSettings
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.stamps import channel_as

T = TypeVar("T")
MD5 = common_pb2.ALGORITHM_MD5
FINAL = {
    task_pb2.TASK_STATUS_SUCCEEDED,
    task_pb2.TASK_STATUS_CANCELLED,
    task_pb2.TASK_STATUS_DEAD_LETTER,
}


def with_store(dsn: str, body: Callable[[PostgresTaskStore], Awaitable[T]]) -> T:
    async def main() -> T:
        pool = db.make_pool(DatabaseSettings(dsn=dsn, pool_max=4), name="test")
        await pool.open()
        try:
            return await body(PostgresTaskStore(pool, keyring=TaskKeyring.from_env()))
        finally:
            await pool.close()

    return asyncio.run(main())


@pytest.fixture
def stub_for() -> Iterator[Callable[..., task_pb2_grpc.TaskServiceStub]]:
    """``stub_for(address)``: calls as whatever the address makes us; ``stub_for(address,
    "c1")``: a replica's calls stamped as client ``c1`` (the balancer's word, tests.stamps)."""
    channels: list[grpc.Channel] = []

    def make(
        address: str, identity: str | None = None, *, operator: bool = False
    ) -> task_pb2_grpc.TaskServiceStub:
        if identity is None:
            channels.append(grpc.insecure_channel(address))
        else:
            channels.append(channel_as(address, identity, operator=operator))
        return task_pb2_grpc.TaskServiceStub(channels[-1])

    yield make
    for channel in channels:
        channel.close()


def md5_spec(data: bytes, **fields: Any) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(algorithm=MD5, data=data, **fields)


def watch_until_final(
    stub: task_pb2_grpc.TaskServiceStub, task_id: str, timeout: float = 20
) -> list[task_pb2.Task]:
    seen = [m.task for m in stub.WatchTask(task_pb2.WatchTaskRequest(id=task_id), timeout=timeout)]
    assert seen and seen[-1].status in FINAL
    return seen


def violations(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields += [v.field for v in bad.field_violations]
    return fields


# -- store level ---------------------------------------------------------------------------


def test_claims_follow_priority_then_age_and_respect_run_after(dsn: str) -> None:
    async def body(store: PostgresTaskStore) -> None:
        later = datetime.now(UTC) + timedelta(hours=1)
        low, high, old_mid, new_mid, future = [
            s.task
            for s in await store.submit_many(
                [
                    NewTask("md5", b"low", priority=-5),
                    NewTask("md5", b"high", priority=50),
                    NewTask("md5", b"mid-1", priority=0),
                    NewTask("md5", b"mid-2", priority=0),
                    NewTask("md5", b"future", priority=100, run_after=later),
                ]
            )
        ]
        order = []
        while claimed := await store.claim("w", 1, 30):
            order.append(claimed[0].id)
        assert order[0] == high.id and order[-1] == low.id
        assert set(order[1:3]) == {old_mid.id, new_mid.id}
        assert future.id not in order
        assert 3500 < (await store.next_due() or 0) <= 3600

    with_store(dsn, body)


def test_completion_is_fenced_by_the_lease(dsn: str) -> None:
    async def body(store: PostgresTaskStore) -> None:
        [sub] = await store.submit_many([NewTask("md5", b"x")])
        [first] = await store.claim("w1", 10, 0.01)
        await asyncio.sleep(0.05)
        assert await store.reclaim_lost() == 1
        [second] = await store.claim("w2", 10, 30)
        assert second.attempts == 2 and second.lease_id != first.lease_id
        assert not await store.complete(first.id, first.lease_id, b"late", "6c617465")
        assert await store.complete(second.id, second.lease_id, b"ok", "6f6b")
        assert not await store.complete(second.id, second.lease_id, b"again", "616761696e")
        final = await store.get(sub.task.id, owner=None)
        assert final.status is TaskStatus.SUCCEEDED and final.result_digest == b"ok"
        assert "lease expired" in (final.last_error or "")

    with_store(dsn, body)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT completions FROM hashmesh_tasks").fetchall() == [(1,)]


def test_running_task_cancels_cooperatively_and_release_hands_back(dsn: str) -> None:
    async def body(store: PostgresTaskStore) -> None:
        subs = await store.submit_many([NewTask("md5", b"a"), NewTask("md5", b"b")])
        a, b = await store.claim("w", 10, 30)
        cancelling = await store.cancel(a.id, owner=None)
        assert cancelling.status is TaskStatus.RUNNING and cancelling.cancel_requested
        renewed = await store.heartbeat(
            "w",
            [Lease(a.id, a.lease_id), Lease(b.id, b.lease_id)],
            lease_seconds=30,
            in_flight=2,
            processed=0,
        )
        assert renewed == {a.id: True, b.id: False}
        assert await store.acknowledge_cancel([Lease(a.id, a.lease_id)]) == {a.id}
        assert await store.release([Lease(b.id, b.lease_id)]) == {b.id}
        released = await store.get(b.id, owner=None)
        assert released.status is TaskStatus.PENDING and released.attempts == 0
        assert (await store.get(a.id, owner=None)).status is TaskStatus.CANCELLED
        assert {s.task.id for s in subs} == {a.id, b.id}

    with_store(dsn, body)


def test_cancelled_while_running_result_is_dropped(dsn: str) -> None:
    async def body(store: PostgresTaskStore) -> None:
        await store.submit_many([NewTask("argon2id", b"pw", params={})])
        [task] = await store.claim("w", 1, 30)
        await store.cancel(task.id, owner=None)
        assert await store.complete_many([Completion(task.id, task.lease_id, b"d", "e")]) == {
            task.id
        }
        final = await store.get(task.id, owner=None)
        assert final.status is TaskStatus.CANCELLED and final.result_digest is None

    with_store(dsn, body)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT input, completions FROM hashmesh_tasks").fetchall() == [
            (None, 0)
        ]
        # The schema itself refuses a final argon2 task that still holds its input.
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE hashmesh_tasks SET input = 'pw'")


# -- through a hashd process ---------------------------------------------------------------


def test_submit_watch_and_result_through_workerd(dsn: str, procs: Processes, stub_for: Any) -> None:
    hashd = procs.hashd(dsn)
    procs.workerd(dsn, "--name", "w-int")
    stub = stub_for(hashd.address, "c1")
    reply = stub.SubmitTask(
        task_pb2.SubmitTaskRequest(spec=md5_spec(b"hello"), client_id="c1"), timeout=10
    )
    assert reply.created and reply.task.client_id == "c1"
    seen = watch_until_final(stub, reply.task.id)
    final = seen[-1]
    assert final.status == task_pb2.TASK_STATUS_SUCCEEDED
    assert final.result.digest == hashlib.md5(b"hello").digest() and not final.result.cached
    assert final.worker == "w-int" and final.attempts == 1
    statuses = [t.status for t in seen]
    assert statuses == sorted(
        statuses,
        key=[
            task_pb2.TASK_STATUS_PENDING,
            task_pb2.TASK_STATUS_RUNNING,
            task_pb2.TASK_STATUS_SUCCEEDED,
        ].index,
    )
    stats = stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10)
    assert stats.workers_alive == 1 and not stats.workers  # which workers: for operators
    stats = stub_for(hashd.address, "ops", operator=True).GetQueueStats(
        task_pb2.GetQueueStatsRequest(), timeout=10
    )
    assert stats.workers_alive == 1 and stats.workers[0].name == "w-int"
    assert {c.status: c.count for c in stats.counts}[task_pb2.TASK_STATUS_SUCCEEDED] == 1
    assert stats.completed_last_minute == 1


def test_batch_idempotency_and_validation(dsn: str, procs: Processes, stub_for: Any) -> None:
    address = procs.hashd(dsn).address
    stub = stub_for(address, "c")
    specs = [
        md5_spec(b"a", idempotency_key="k1"),
        md5_spec(b"b"),
        md5_spec(b"a", idempotency_key="k1"),
    ]
    first = stub.SubmitTasks(task_pb2.SubmitTasksRequest(specs=specs, client_id="c"), timeout=10)
    assert list(first.created) == [True, True, False]
    assert first.tasks[0].id == first.tasks[2].id != first.tasks[1].id
    again = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=specs[0], client_id="c"), timeout=10)
    assert not again.created and again.task.id == first.tasks[0].id
    other_client = stub_for(address, "d").SubmitTask(
        task_pb2.SubmitTaskRequest(spec=specs[0], client_id="d"), timeout=10
    )
    assert other_client.created and other_client.task.id != first.tasks[0].id

    # Concurrent duplicates: one task, whoever wins.
    ids: list[str] = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        ids.append(
            stub.SubmitTask(
                task_pb2.SubmitTaskRequest(
                    spec=md5_spec(b"z", idempotency_key="race"), client_id="c"
                ),
                timeout=10,
            ).task.id
        )

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(ids) == 8 and len(set(ids)) == 1

    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitTasks(
            task_pb2.SubmitTasksRequest(specs=[md5_spec(b"ok"), md5_spec(b"x", priority=1000)]),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(caught.value) == ["specs[1].priority"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTask(task_pb2.GetTaskRequest(id="nope"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(caught.value) == [
        "id"
    ]
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetTask(task_pb2.GetTaskRequest(id="00000000-0000-0000-0000-000000000000"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM hashmesh_tasks").fetchone() == (4,)


def test_backpressure_refuses_whole_batches(dsn: str, procs: Processes, stub_for: Any) -> None:
    hashd = procs.hashd(
        dsn, env={"HASHMESH_MAX_PENDING_TASKS": "6", "HASHMESH_MAX_PENDING_PER_CLIENT": "4"}
    )
    stub_for(hashd.address, "a").SubmitTasks(
        task_pb2.SubmitTasksRequest(specs=[md5_spec(b"%d" % i) for i in range(4)], client_id="a"),
        timeout=10,
    )
    for client, size, reason in (("a", 1, "CLIENT_QUEUE_FULL"), ("b", 3, "QUEUE_FULL")):
        with pytest.raises(grpc.RpcError) as caught:
            stub_for(hashd.address, client).SubmitTasks(
                task_pb2.SubmitTasksRequest(specs=[md5_spec(b"x")] * size, client_id=client),
                timeout=10,
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
        assert status is not None
        kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
        assert {"RetryInfo", "ErrorInfo"} <= kinds and reason in str(status.details)
    stub_for(hashd.address, "b").SubmitTasks(
        task_pb2.SubmitTasksRequest(specs=[md5_spec(b"y")] * 2, client_id="b"), timeout=10
    )
    with psycopg.connect(dsn) as conn:
        rows = dict(
            conn.execute("SELECT client_id, count(*) FROM hashmesh_tasks GROUP BY 1").fetchall()
        )
    assert rows == {"a": 4, "b": 2}


def test_cached_result_finishes_at_once_and_argon2_input_is_erased(
    dsn: str, procs: Processes, stub_for: Any
) -> None:
    hashd = procs.hashd(dsn)
    procs.workerd(dsn)
    stub = stub_for(hashd.address)
    params = common_pb2.Argon2Params(
        time_cost=1, memory_cost_kib=8192, parallelism=1, salt=b"saltsalt"
    )
    spec = task_pb2.TaskSpec(
        algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"hunter2", argon2=params
    )
    first = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10)
    done = watch_until_final(stub, first.task.id)[-1]
    assert done.status == task_pb2.TASK_STATUS_SUCCEEDED and not done.result.cached
    deadline = time.monotonic() + 10
    early = []  # submitted before the result reached the cache: queued like the first
    while True:  # the worker stores the result in the shared cache just after writing it
        second = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10).task
        if second.status == task_pb2.TASK_STATUS_SUCCEEDED or time.monotonic() > deadline:
            break
        early.append(second.id)
        time.sleep(0.1)
    for task_id in early:  # their inputs are erased when they end, not before
        watch_until_final(stub, task_id)
    assert second.status == task_pb2.TASK_STATUS_SUCCEEDED and second.result.cached
    assert second.result.encoded == done.result.encoded and second.attempts == 0
    with psycopg.connect(dsn) as conn:
        inputs = conn.execute(
            "SELECT input FROM hashmesh_tasks WHERE algorithm = 'argon2id'"
        ).fetchall()
    assert inputs and all(row[0] is None for row in inputs)
    # No input in any log line.
    for proc in procs.started:
        assert "hunter2" not in proc.log()


def test_cancel_requeue_list_and_pages(dsn: str, procs: Processes, stub_for: Any) -> None:
    address = procs.hashd(dsn).address
    stub = stub_for(address, "lister")
    operator = stub_for(address, "ops", operator=True)
    md5_ids = [
        t.id
        for t in stub.SubmitTasks(
            task_pb2.SubmitTasksRequest(
                specs=[md5_spec(b"%d" % i) for i in range(25)], client_id="lister"
            ),
            timeout=10,
        ).tasks
    ]
    sha = (
        stub_for(address, "other")
        .SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA1, data=b"s"),
                client_id="other",
            ),
            timeout=10,
        )
        .task
    )

    cancelled = stub.CancelTask(task_pb2.CancelTaskRequest(id=md5_ids[0]), timeout=10).task
    assert cancelled.status == task_pb2.TASK_STATUS_CANCELLED
    with pytest.raises(grpc.RpcError) as caught:
        stub.CancelTask(task_pb2.CancelTaskRequest(id=md5_ids[0]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    with pytest.raises(grpc.RpcError) as caught:
        stub.RequeueTask(task_pb2.RequeueTaskRequest(id=md5_ids[1]), timeout=10)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    requeued = stub.RequeueTask(task_pb2.RequeueTaskRequest(id=md5_ids[0]), timeout=10).task
    assert requeued.status == task_pb2.TASK_STATUS_PENDING and requeued.attempts == 0

    pages, token = [], ""
    while True:
        page = stub.ListTasks(
            task_pb2.ListTasksRequest(client_id="lister", page_size=10, page_token=token),
            timeout=10,
        )
        pages.append([t.id for t in page.tasks])
        token = page.next_page_token
        if len(pages) == 1:
            # Newer tasks do not shift later pages (keyset on created_at, id).
            stub.SubmitTasks(
                task_pb2.SubmitTasksRequest(specs=[md5_spec(b"new")] * 5, client_id="lister"),
                timeout=10,
            )
        if not token:
            break
    assert [len(p) for p in pages] == [10, 10, 5]
    listed = [i for p in pages for i in p]
    assert sorted(listed) == sorted(md5_ids)
    by_algorithm = operator.ListTasks(
        task_pb2.ListTasksRequest(algorithm=common_pb2.ALGORITHM_SHA1), timeout=10
    )
    assert [t.id for t in by_algorithm.tasks] == [sha.id]
    assert not stub.ListTasks(  # lister's own: none of them is SHA-1
        task_pb2.ListTasksRequest(algorithm=common_pb2.ALGORITHM_SHA1), timeout=10
    ).tasks
    by_status = operator.ListTasks(
        task_pb2.ListTasksRequest(statuses=[task_pb2.TASK_STATUS_PENDING], client_id="other"),
        timeout=10,
    )
    assert [t.id for t in by_status.tasks] == [sha.id]
    with pytest.raises(grpc.RpcError) as caught:
        operator.ListTasks(
            task_pb2.ListTasksRequest(client_id="other", page_token=page.next_page_token or "x"),
            timeout=10,
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stats = stub.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10)
    assert {c.status: c.count for c in stats.counts}[task_pb2.TASK_STATUS_PENDING] == 31
    assert stats.oldest_pending_age.ToNanoseconds() > 0 and stats.workers_alive == 0


def test_nul_text_and_oversized_input_are_invalid_arguments(
    dsn: str, procs: Processes, stub_for: Any
) -> None:
    limit = {"HASHMESH_MAX_MESSAGE_BYTES": "2048"}
    hashd = procs.hashd(dsn, env=limit)
    balancer = procs.balancer([hashd.address], env=limit)
    stub = stub_for(balancer.address)
    cases = [
        (task_pb2.SubmitTaskRequest(spec=md5_spec(b"x"), client_id="a\x00b"), "client_id"),
        (
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"x", idempotency_key="k\x00")),
            "spec.idempotency_key",
        ),
        # Over the unary limit (but under the 2x gRPC lets through): refused, never stored.
        (task_pb2.SubmitTaskRequest(spec=md5_spec(b"x" * 3000)), "spec.data"),
        # Due in 2099: it would hold a pending slot for decades.
        (
            task_pb2.SubmitTaskRequest(
                spec=md5_spec(b"x", run_after=timestamp_pb2.Timestamp(seconds=4_070_908_800))
            ),
            "spec.run_after",
        ),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as caught:
            stub.SubmitTask(request, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert violations(caught.value) == [field]
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitTasks(
            task_pb2.SubmitTasksRequest(specs=[md5_spec(b"ok"), md5_spec(b"y" * 3000)]),
            timeout=10,
        )
    assert violations(caught.value) == ["specs[1].data"]
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListTasks(task_pb2.ListTasksRequest(client_id="\x00"), timeout=10)
    assert violations(caught.value) == ["client_id"]
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM hashmesh_tasks").fetchone() == (0,)

    # Through the balancer, an input between 1x and 2x the limit reaches hashd and gets its
    # own answer (ErrorInfo INPUT_TOO_LARGE), not gRPC's bare "larger than max".
    with (
        grpc.insecure_channel(balancer.address) as channel,
        pytest.raises(grpc.RpcError) as caught,
    ):
        hash_pb2_grpc.HashServiceStub(channel).Hash(
            hash_pb2.HashRequest(algorithm=MD5, data=b"z" * 3000), timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # as SubmitTask's
    assert "INPUT_TOO_LARGE" in str(rpc_status.from_call(caught.value))  # type: ignore[arg-type]
    assert "Traceback" not in hashd.log() and "Traceback" not in balancer.log()
