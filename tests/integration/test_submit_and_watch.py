"""SubmitAndWatchTask end to end: a client, the balancer (with API keys, so two tenants), a real
hashd, workerd and PostgreSQL. The one call behaves as SubmitTask followed by WatchTask:
validation, tenancy, idempotency and statuses; the stream ends at the final state, and a
client that goes away leaves its task to run."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.balancer.keys import generate_key, key_line
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Proc, Processes
from tests.integration.test_tasks import FINAL, violations

pytestmark = pytest.mark.timeout(120)

MD5 = common_pb2.ALGORITHM_MD5
PENDING, RUNNING, SUCCEEDED = (
    task_pb2.TASK_STATUS_PENDING,
    task_pb2.TASK_STATUS_RUNNING,
    task_pb2.TASK_STATUS_SUCCEEDED,
)
ORDER = [PENDING, RUNNING, SUCCEEDED]
RESOURCE_INFO = error_details_pb2.ResourceInfo.DESCRIPTOR


@dataclass
class Mesh:
    tasks: task_pb2_grpc.TaskServiceStub
    alice: tuple[tuple[str, str], ...]
    bob: tuple[tuple[str, str], ...]
    procs: Processes
    dsn: str


@pytest.fixture
def mesh(dsn: str, procs: Processes, tmp_path: Path) -> Iterator[Mesh]:
    """The balancer in front of one hashd; no workerd until a test starts one."""
    alice, bob = generate_key(), generate_key()
    keys = tmp_path / "keys"
    keys.write_text(f"{key_line('alice', alice)}\n{key_line('bob', bob)}\n")
    hashd = procs.hashd(dsn)
    balancer = procs.balancer([hashd.address], env={"HASHMESH_BALANCER_API_KEYS_FILE": str(keys)})
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        yield Mesh(
            task_pb2_grpc.TaskServiceStub(channel),
            (("x-api-key", alice),),
            (("x-api-key", bob),),
            procs,
            dsn,
        )


def spec(**fields: object) -> task_pb2.TaskSpec:
    # Fresh data per call: a result in the shared cache would finish the task at submission.
    return task_pb2.TaskSpec(algorithm=MD5, data=uuid.uuid4().bytes, **fields)  # type: ignore[arg-type]


def submit_and_watch(
    mesh: Mesh, task: task_pb2.TaskSpec, who: tuple[tuple[str, str], ...]
) -> list[task_pb2.SubmitAndWatchTaskResponse]:
    return list(
        mesh.tasks.SubmitAndWatchTask(
            task_pb2.SubmitAndWatchTaskRequest(spec=task), timeout=30, metadata=who
        )
    )


def start_worker(mesh: Mesh) -> Proc:
    return mesh.procs.workerd(mesh.dsn, "--name", "w-saw")


def test_one_call_streams_acceptance_then_every_state_until_the_result(mesh: Mesh) -> None:
    start_worker(mesh)
    task = spec()
    seen = submit_and_watch(mesh, task, mesh.alice)
    first, final = seen[0], seen[-1]
    assert first.created and first.task.status == PENDING and first.task.client_id == "alice"
    assert all(m.created and m.task.id == first.task.id for m in seen)
    # The stream ended by itself, at the final state, which it reached once.
    assert final.task.status == SUCCEEDED
    assert [m.task.status in FINAL for m in seen].count(True) == 1
    assert final.task.result.digest == hashlib.md5(task.data).digest()
    assert final.task.worker == "w-saw" and final.task.attempts == 1
    statuses = [m.task.status for m in seen]
    assert statuses == sorted(statuses, key=ORDER.index) and len(set(statuses)) == len(statuses)
    # The same task, as GetTask and WatchTask tell it.
    got = mesh.tasks.GetTask(
        task_pb2.GetTaskRequest(id=first.task.id), timeout=10, metadata=mesh.alice
    ).task
    assert got.status == SUCCEEDED and got.result.encoded == final.task.result.encoded


def test_bad_fields_are_refused_by_name_before_anything_is_stored(mesh: Mesh) -> None:
    for request, field in (
        (task_pb2.SubmitAndWatchTaskRequest(), "spec"),
        (task_pb2.SubmitAndWatchTaskRequest(spec=spec(priority=1000)), "spec.priority"),
        (task_pb2.SubmitAndWatchTaskRequest(spec=spec(max_attempts=-1)), "spec.max_attempts"),
        (task_pb2.SubmitAndWatchTaskRequest(spec=task_pb2.TaskSpec(data=b"x")), "spec.algorithm"),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            list(mesh.tasks.SubmitAndWatchTask(request, timeout=10, metadata=mesh.alice))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(caught.value) == [field]
    with pytest.raises(grpc.RpcError) as caught:
        submit_and_watch_as(mesh, spec(), client_id="bob")
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = mesh.tasks.ListTasks(task_pb2.ListTasksRequest(), timeout=10, metadata=mesh.alice)
    assert not listed.tasks


def submit_and_watch_as(mesh: Mesh, task: task_pb2.TaskSpec, *, client_id: str) -> None:
    list(
        mesh.tasks.SubmitAndWatchTask(
            task_pb2.SubmitAndWatchTaskRequest(spec=task, client_id=client_id),
            timeout=10,
            metadata=mesh.alice,
        )
    )


def test_idempotency_keys_replay_the_same_task_per_tenant(mesh: Mesh) -> None:
    start_worker(mesh)
    task = spec(idempotency_key="order-17")
    first = submit_and_watch(mesh, task, mesh.alice)
    again = submit_and_watch(mesh, task, mesh.alice)
    # The replay is the first task, already final: one message, not created, same result.
    assert [m.created for m in again] == [False]
    assert again[0].task.id == first[0].task.id and again[0].task.status == SUCCEEDED
    assert again[0].task.result.encoded == first[-1].task.result.encoded
    # Bob's key of the same name is his own: a task of his, not Alice's.
    bobs = submit_and_watch(mesh, task, mesh.bob)
    assert bobs[0].created and bobs[0].task.id != first[0].task.id
    assert bobs[-1].task.client_id == "bob" and bobs[-1].task.status == SUCCEEDED
    # The key with another request is refused, naming the first task.
    with pytest.raises(grpc.RpcError) as caught:
        submit_and_watch(mesh, spec(idempotency_key="order-17"), mesh.alice)
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    named = []
    for detail in status.details:
        if detail.Is(RESOURCE_INFO):
            info = error_details_pb2.ResourceInfo()
            detail.Unpack(info)
            named.append(info.resource_name)
    assert named == [first[0].task.id]


def test_a_client_that_goes_away_leaves_its_task_to_run(mesh: Mesh) -> None:
    call = mesh.tasks.SubmitAndWatchTask(
        task_pb2.SubmitAndWatchTaskRequest(spec=spec()), timeout=30, metadata=mesh.alice
    )
    first = next(call)
    assert first.created and first.task.status == PENDING
    call.cancel()
    with pytest.raises(grpc.RpcError) as caught:
        next(call)
    assert caught.value.code() == grpc.StatusCode.CANCELLED
    # No worker yet: the task waits, neither lost nor cancelled.
    got = mesh.tasks.GetTask(
        task_pb2.GetTaskRequest(id=first.task.id), timeout=10, metadata=mesh.alice
    ).task
    assert got.status == PENDING and not got.cancel_requested
    start_worker(mesh)
    watched = [
        m.task
        for m in mesh.tasks.WatchTask(
            task_pb2.WatchTaskRequest(id=first.task.id), timeout=30, metadata=mesh.alice
        )
    ]
    assert watched[-1].status == SUCCEEDED and watched[-1].attempts == 1
