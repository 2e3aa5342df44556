"""The error catalogue against a real mesh: every entry of ``hashmesh.core.catalogue`` is
provoked through a balancer in front of real hashd processes (and a workerd), and what the
client sees — status code, ErrorInfo reason and domain, the detail messages, retry trailers —
is checked against the entry. An entry without a provocation fails the test (unless listed in
``CANNOT_PROVOKE`` with the reason)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from threading import Event

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2, status_pb2

from hashmesh.balancer.keys import generate_key, key_line
from hashmesh.core.catalogue import CATALOGUE, DOMAIN, Entry, Retry
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres
from hashmesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    hash_pb2,
    hash_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from tests.conftest import Processes

LIMIT = 4096
TOKEN = "the-admin-token"
SHA256, MD5, ARGON2 = (
    common_pb2.ALGORITHM_SHA256,
    common_pb2.ALGORITHM_MD5,
    common_pb2.ALGORITHM_ARGON2ID,
)
CANNOT_PROVOKE = {"INTERNAL": "a bug by definition: no request is meant to provoke it"}
LAST = ("DATABASE_UNAVAILABLE",)
"""Provoked after the others: it stops a PostgreSQL server for good."""


@dataclass
class World:
    main: grpc.Channel
    """Balancer A, in front of replica A (4 KiB unary limit, one CPU thread, no queue)."""
    main_admin: admin_pb2_grpc.AdminServiceStub
    guarded: grpc.Channel
    """Balancer B: API keys, an admin token, one call in flight per replica; in front of
    replica C (its own PostgreSQL; 4 unfinished tasks at most, 2 per client; no task key)."""
    alice: tuple[tuple[str, str], ...]
    bob: tuple[tuple[str, str], ...]
    owned_pg: EmbeddedPostgres
    replica: str
    """Replica A itself, for what only a caller bypassing the balancer can send."""
    budgeted: grpc.Channel
    """Balancer D: API keys, one upload stream per client and two in all; before replica A."""


Provocation = Callable[[World], tuple[str, grpc.RpcError]]


def refused(method: str, call: Callable[[], object]) -> tuple[str, grpc.RpcError]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return method, caught.value


def later() -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.now(UTC) + timedelta(days=1))
    return stamp


def hashes(channel: grpc.Channel) -> hash_pb2_grpc.HashServiceStub:
    return hash_pb2_grpc.HashServiceStub(channel)


def tasks(channel: grpc.Channel) -> task_pb2_grpc.TaskServiceStub:
    return task_pb2_grpc.TaskServiceStub(channel)


def pending(world: World, algorithm: int = MD5) -> str:
    spec = task_pb2.TaskSpec(algorithm=algorithm, data=b"secret", run_after=later())
    return str(
        tasks(world.main).SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10).task.id
    )


# -- one provocation per catalogue entry ------------------------------------------------------


def invalid_field(world: World) -> tuple[str, grpc.RpcError]:
    specs = [
        task_pb2.TaskSpec(priority=500),  # no algorithm, priority out of bounds
        task_pb2.TaskSpec(algorithm=SHA256, argon2=common_pb2.Argon2Params(time_cost=3)),
    ]
    method, error = refused(
        "TaskService.SubmitTasks",
        lambda: tasks(world.main).SubmitTasks(task_pb2.SubmitTasksRequest(specs=specs), timeout=10),
    )
    bad = detail(error, error_details_pb2.BadRequest)
    # Every bad field of the batch, not the first one only.
    assert [v.field for v in bad.field_violations] == [
        "specs[0].algorithm",
        "specs[0].priority",
        "specs[1].argon2",
    ]
    assert detail(error, error_details_pb2.ErrorInfo).metadata["violations"] == "3"
    return method, error


def input_too_large(world: World) -> tuple[str, grpc.RpcError]:
    big = b"x" * (LIMIT + 1)
    # The same answer for a unary hash, a task's input and a stream chunk.
    _, task_error = refused(
        "TaskService.SubmitTask",
        lambda: tasks(world.main).SubmitTask(
            task_pb2.SubmitTaskRequest(spec=task_pb2.TaskSpec(algorithm=MD5, data=big)), timeout=10
        ),
    )
    _, chunk_error = refused(
        "HashService.HashStream",
        lambda: hashes(world.main).HashStream(
            iter(
                [
                    hash_pb2.HashStreamRequest(header=hash_pb2.HashStreamHeader(algorithm=SHA256)),
                    hash_pb2.HashStreamRequest(chunk=big),
                ]
            ),
            timeout=10,
        ),
    )
    method, error = refused(
        "HashService.ComputeHash",
        lambda: hashes(world.main).ComputeHash(
            hash_pb2.HashRequest(algorithm=SHA256, data=big), timeout=10
        ),
    )
    for other, field in ((task_error, "spec.data"), (chunk_error, "chunk"), (error, "data")):
        assert other.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        info = detail(other, error_details_pb2.ErrorInfo)
        assert info.reason == "INPUT_TOO_LARGE" and info.metadata["limit_bytes"] == str(LIMIT)
        assert detail(other, error_details_pb2.BadRequest).field_violations[0].field == field
    return method, error


def malformed_request(world: World) -> tuple[str, grpc.RpcError]:
    raw = world.main.unary_unary("/hashmesh.v1.HashService/ComputeHash")
    return refused("HashService.ComputeHash", lambda: raw(b"\xff\xff\xff", timeout=10))


def message_too_large(world: World) -> tuple[str, grpc.RpcError]:
    return refused(
        "HashService.ComputeHash",
        lambda: hashes(world.main).ComputeHash(
            hash_pb2.HashRequest(algorithm=SHA256, data=b"x" * (3 * LIMIT)), timeout=10
        ),
    )


def task_not_found(world: World) -> tuple[str, grpc.RpcError]:
    missing = str(uuid.uuid4())
    method, error = refused(
        "TaskService.GetTask",
        lambda: tasks(world.main).GetTask(task_pb2.GetTaskRequest(id=missing), timeout=10),
    )
    info = detail(error, error_details_pb2.ResourceInfo)
    assert info.resource_type == "hashmesh.v1.Task" and info.resource_name == missing
    return method, error


def backend_not_found(world: World) -> tuple[str, grpc.RpcError]:
    method, error = refused(
        "AdminService.DrainBackend",
        lambda: world.main_admin.DrainBackend(
            admin_pb2.DrainBackendRequest(address="127.0.0.1:1"), timeout=10
        ),
    )
    assert detail(error, error_details_pb2.ResourceInfo).resource_name == "127.0.0.1:1"
    return method, error


def idempotency_key_reused(world: World) -> tuple[str, grpc.RpcError]:
    stub = tasks(world.main)
    first = task_pb2.TaskSpec(
        algorithm=MD5, data=b"one", idempotency_key="k-reused", run_after=later()
    )
    task_id = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=first), timeout=10).task.id
    other = task_pb2.TaskSpec(
        algorithm=MD5, data=b"two", idempotency_key="k-reused", run_after=later()
    )
    method, error = refused(
        "TaskService.SubmitTask",
        lambda: stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=other), timeout=10),
    )
    assert detail(error, error_details_pb2.ErrorInfo).metadata["task_id"] == task_id
    assert detail(error, error_details_pb2.ResourceInfo).resource_name == task_id
    return method, error


def identity_stamp_invalid(world: World) -> tuple[str, grpc.RpcError]:
    forged = (("x-hashmesh-identity", "alice"), ("x-hashmesh-identity-sig", "v1.0.forged"))
    with grpc.insecure_channel(world.replica) as channel:
        return refused(
            "TaskService.ListTasks",
            lambda: tasks(channel).ListTasks(
                task_pb2.ListTasksRequest(), timeout=10, metadata=forged
            ),
        )


def client_id_not_caller(world: World) -> tuple[str, grpc.RpcError]:
    spec = task_pb2.TaskSpec(algorithm=MD5, data=b"x", run_after=later())
    return refused(
        "TaskService.SubmitTask",
        lambda: tasks(world.main).SubmitTask(
            task_pb2.SubmitTaskRequest(spec=spec, client_id="someone-else"), timeout=10
        ),
    )


def operator_only(world: World) -> tuple[str, grpc.RpcError]:
    return refused(
        "CacheService.ClearCache",
        lambda: cache_pb2_grpc.CacheServiceStub(world.main).ClearCache(
            cache_pb2.ClearCacheRequest(), timeout=10
        ),
    )


def task_finished(world: World) -> tuple[str, grpc.RpcError]:
    task_id = pending(world)
    stub = tasks(world.main)
    stub.CancelTask(task_pb2.CancelTaskRequest(id=task_id), timeout=10)
    method, error = refused(
        "TaskService.CancelTask",
        lambda: stub.CancelTask(task_pb2.CancelTaskRequest(id=task_id), timeout=10),
    )
    assert (
        detail(error, error_details_pb2.PreconditionFailure).violations[0].subject
        == f"tasks/{task_id}"
    )
    return method, error


def task_not_requeueable(world: World) -> tuple[str, grpc.RpcError]:
    task_id = pending(world)
    return refused(
        "TaskService.RequeueTask",
        lambda: tasks(world.main).RequeueTask(task_pb2.RequeueTaskRequest(id=task_id), timeout=10),
    )


def task_input_erased(world: World) -> tuple[str, grpc.RpcError]:
    task_id = pending(world, ARGON2)
    stub = tasks(world.main)
    stub.CancelTask(task_pb2.CancelTaskRequest(id=task_id), timeout=10)
    return refused(
        "TaskService.RequeueTask",
        lambda: stub.RequeueTask(task_pb2.RequeueTaskRequest(id=task_id), timeout=10),
    )


def argon2_tasks_disabled(world: World) -> tuple[str, grpc.RpcError]:
    spec = task_pb2.TaskSpec(algorithm=ARGON2, data=b"password", run_after=later())
    return refused(
        "TaskService.SubmitTask",
        lambda: tasks(world.guarded).SubmitTask(
            task_pb2.SubmitTaskRequest(spec=spec), timeout=10, metadata=world.alice
        ),
    )


def rate_limited(world: World) -> tuple[str, grpc.RpcError]:
    world.main_admin.SetRateLimits(
        admin_pb2.SetRateLimitsRequest(
            default_limit=admin_pb2.RateLimit(rate_per_second=0.001, burst=1)
        ),
        timeout=10,
    )
    try:
        request = hash_pb2.HashRequest(algorithm=SHA256, data=b"x")
        _, call = hashes(world.main).ComputeHash.with_call(request, timeout=10)
        assert dict(call.initial_metadata())["ratelimit"].startswith('"default";r=0;')
        method, error = refused(
            "HashService.ComputeHash", lambda: hashes(world.main).ComputeHash(request, timeout=10)
        )
        headers = dict(error.initial_metadata())  # type: ignore[attr-defined]
        assert headers["ratelimit-policy"] == '"default";q=1;w=1000'
        assert headers["ratelimit"].startswith('"default";r=0;t=')
    finally:
        world.main_admin.SetRateLimits(admin_pb2.SetRateLimitsRequest(disable=True), timeout=10)
    return method, error


_UPLOAD_HEADER = hash_pb2.HashStreamRequest(header=hash_pb2.HashStreamHeader(algorithm=SHA256))


class _HeldUploads:
    """One upload stream per key on balancer D, each sending its header and then waiting until
    ``release()``. A stream refused as it opens (RESOURCE_EXHAUSTED: the budget of an earlier
    call, which the balancer gives back just after its client has the answer) is opened
    again by ``check()``."""

    def __init__(self, world: World, keys: list[tuple[tuple[str, str], ...]]) -> None:
        self._stub = hashes(world.budgeted)
        self._released = Event()
        self._streams = {key: self._open(key) for key in keys}

    def _open(self, key: tuple[tuple[str, str], ...]) -> grpc.Future:
        def messages() -> Iterator[hash_pb2.HashStreamRequest]:
            yield _UPLOAD_HEADER
            self._released.wait(60)

        return self._stub.HashStream.future(messages(), timeout=60, metadata=key)

    def check(self) -> None:
        for key, stream in self._streams.items():
            if stream.done():
                error = stream.exception()
                assert _refused_over_budget(error), f"a held upload stream ended: {error}"
                self._streams[key] = self._open(key)

    def release(self) -> None:
        self._released.set()
        for stream in self._streams.values():
            error = stream.exception(timeout=30)
            assert error is None or _refused_over_budget(error), error


def _refused_over_budget(error: object) -> bool:
    return (
        isinstance(error, grpc.RpcError) and error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    )


def _over_budget(
    world: World, key: tuple[tuple[str, str], ...], reason: str, held: _HeldUploads
) -> grpc.RpcError:
    """Upload streams from ``key`` (each ends at once) until one is refused for ``reason``,
    as the ``held`` streams are admitted. Bounded, as the balancer may be slow."""
    stub = hashes(world.budgeted)
    deadline = time.monotonic() + 30
    seen: list[str] = []
    while True:
        held.check()
        try:
            stub.HashStream(iter([_UPLOAD_HEADER]), timeout=10, metadata=key)
            seen.append("OK")
        except grpc.RpcError as error:
            if not _refused_over_budget(error):
                raise
            if detail(error, error_details_pb2.ErrorInfo).reason == reason:  # type: ignore[attr-defined]
                return error
            seen.append(error.details())  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"no {reason} within 30 s; answers: {seen[-3:]}"
        time.sleep(0.05)


def peer_budget_exceeded(world: World) -> tuple[str, grpc.RpcError]:
    # Alice holds her one upload stream; her next is refused, and Bob's still goes through.
    held = _HeldUploads(world, [world.alice])
    try:
        error = _over_budget(world, world.alice, "PEER_BUDGET_EXCEEDED", held)
        assert "HASHMESH_BALANCER_PEER_UPLOAD_STREAMS" in error.details()  # type: ignore[attr-defined]
        hashes(world.budgeted).HashStream(iter([_UPLOAD_HEADER]), timeout=10, metadata=world.bob)
    finally:
        held.release()
    return "HashService.HashStream", error


def balancer_budget_exceeded(world: World) -> tuple[str, grpc.RpcError]:
    # Alice and Bob hold one upload stream each: the balancer's two in all.
    held = _HeldUploads(world, [world.alice, world.bob])
    try:
        error = _over_budget(world, world.alice, "BALANCER_BUDGET_EXCEEDED", held)
        assert "HASHMESH_BALANCER_TOTAL_UPLOAD_STREAMS" in error.details()  # type: ignore[attr-defined]
    finally:
        held.release()
    return "HashService.HashStream", error


def overloaded(world: World) -> tuple[str, grpc.RpcError]:
    # One CPU thread and no queue: of argon2id calls sent at once, all but one are refused.
    async def burst() -> list[BaseException | object]:
        async with grpc.aio.insecure_channel(address_of(world.main)) as channel:
            stub = hash_pb2_grpc.HashServiceStub(channel)
            request = hash_pb2.HashRequest(
                algorithm=ARGON2, data=b"pw", argon2=common_pb2.Argon2Params(time_cost=10)
            )
            return await asyncio.gather(
                *(stub.ComputeHash(request, timeout=60) for _ in range(4)), return_exceptions=True
            )

    answers = asyncio.run(burst())
    errors = [a for a in answers if isinstance(a, grpc.aio.AioRpcError)]
    assert errors and len(errors) < len(answers), answers
    return "HashService.ComputeHash", errors[0]


def queue_full(world: World) -> tuple[str, grpc.RpcError]:
    specs = [task_pb2.TaskSpec(algorithm=MD5, data=b"q", run_after=later()) for _ in range(5)]
    return refused(
        "TaskService.SubmitTasks",
        lambda: tasks(world.guarded).SubmitTasks(
            task_pb2.SubmitTasksRequest(specs=specs), timeout=10, metadata=world.bob
        ),
    )


def client_queue_full(world: World) -> tuple[str, grpc.RpcError]:
    stub = tasks(world.guarded)
    request = task_pb2.SubmitTaskRequest(
        spec=task_pb2.TaskSpec(algorithm=MD5, data=b"c", run_after=later())
    )
    for _ in range(2):
        stub.SubmitTask(request, timeout=10, metadata=world.alice)
    return refused(
        "TaskService.SubmitTask", lambda: stub.SubmitTask(request, timeout=10, metadata=world.alice)
    )


def no_replica(world: World) -> tuple[str, grpc.RpcError]:
    [backend] = world.main_admin.ListBackends(admin_pb2.ListBackendsRequest(), timeout=10).backends
    world.main_admin.DrainBackend(
        admin_pb2.DrainBackendRequest(address=backend.address), timeout=10
    )
    try:
        return refused(
            "HashService.ComputeHash",
            lambda: hashes(world.main).ComputeHash(
                hash_pb2.HashRequest(algorithm=SHA256, data=b"x"), timeout=10
            ),
        )
    finally:
        world.main_admin.DrainBackend(
            admin_pb2.DrainBackendRequest(address=backend.address, undrain=True), timeout=10
        )


def replicas_busy(world: World) -> tuple[str, grpc.RpcError]:
    # A WatchTask stream holds replica C's only stream slot while a second stream comes
    # (streams have slots of their own: they never take a unary call's).
    stub = tasks(world.guarded)
    spec = task_pb2.TaskSpec(algorithm=MD5, data=b"w", run_after=later())
    task_id = stub.SubmitTask(
        task_pb2.SubmitTaskRequest(spec=spec), timeout=10, metadata=world.bob
    ).task.id
    watch = stub.WatchTask(task_pb2.WatchTaskRequest(id=task_id), timeout=30, metadata=world.bob)
    try:
        next(watch)  # the current state: the stream is open on the replica
        return refused(
            "TaskService.WatchTask",
            lambda: next(
                stub.WatchTask(
                    task_pb2.WatchTaskRequest(id=task_id), timeout=10, metadata=world.bob
                )
            ),
        )
    finally:
        watch.cancel()


def database_unavailable(world: World) -> tuple[str, grpc.RpcError]:
    world.owned_pg.stop()
    stub = tasks(world.guarded)
    # Until replica C notices; each answer comes at once or after its own bounded retries.
    give_up = time.monotonic() + 60
    while True:
        method, error = refused(
            "TaskService.GetQueueStats",
            lambda: stub.GetQueueStats(
                task_pb2.GetQueueStatsRequest(), timeout=20, metadata=world.bob
            ),
        )
        if error.code() is grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:  # type: ignore[attr-defined]
            return method, error


def _hash_on(world: World, metadata: tuple[tuple[str, str], ...]) -> Callable[[], object]:
    return lambda: hashes(world.guarded).ComputeHash(
        hash_pb2.HashRequest(algorithm=SHA256, data=b"x"), timeout=10, metadata=metadata
    )


def _stats_on(
    channel: grpc.Channel, metadata: tuple[tuple[str, str], ...] = ()
) -> Callable[[], object]:
    return lambda: admin_pb2_grpc.AdminServiceStub(channel).GetStats(
        admin_pb2.GetStatsRequest(), timeout=10, metadata=metadata
    )


def admin_token_invalid(world: World) -> tuple[str, grpc.RpcError]:
    wrong = (("authorization", "Bearer wrong"),)
    # On a proxied call too: a valid token would make the caller an operator.
    _, proxied = refused("HashService.ComputeHash", _hash_on(world, (*world.alice, *wrong)))
    assert proxied.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert detail(proxied, error_details_pb2.ErrorInfo).reason == "ADMIN_TOKEN_INVALID"
    return refused("AdminService.GetStats", _stats_on(world.guarded, wrong))


def deadline_passed(world: World) -> tuple[str, grpc.RpcError]:
    # A server can only see a deadline pass after the client's own has: what a client gets is
    # its library's DEADLINE_EXCEEDED (a tiny positive timeout may even win the race and
    # succeed, so the deadline is already past when the call starts).
    return refused(
        "HashService.ComputeHash",
        lambda: hashes(world.main).ComputeHash(
            hash_pb2.HashRequest(algorithm=SHA256, data=b"x"), timeout=-1
        ),
    )


def unimplemented(world: World) -> tuple[str, grpc.RpcError]:
    raw = world.main.unary_unary("/hashmesh.v1.HashService/NoSuchMethod")
    return refused("", lambda: raw(b"", timeout=10))


PROVOKE: dict[str, Provocation] = {
    "INVALID_FIELD": invalid_field,
    "INPUT_TOO_LARGE": input_too_large,
    "MALFORMED_REQUEST": malformed_request,
    "MESSAGE_TOO_LARGE": message_too_large,
    "TASK_NOT_FOUND": task_not_found,
    "BACKEND_NOT_FOUND": backend_not_found,
    "IDEMPOTENCY_KEY_REUSED": idempotency_key_reused,
    "IDENTITY_STAMP_INVALID": identity_stamp_invalid,
    "CLIENT_ID_NOT_CALLER": client_id_not_caller,
    "OPERATOR_ONLY": operator_only,
    "TASK_FINISHED": task_finished,
    "TASK_NOT_REQUEUEABLE": task_not_requeueable,
    "TASK_INPUT_ERASED": task_input_erased,
    "ARGON2_TASKS_DISABLED": argon2_tasks_disabled,
    "RATE_LIMITED": rate_limited,
    "PEER_BUDGET_EXCEEDED": peer_budget_exceeded,
    "BALANCER_BUDGET_EXCEEDED": balancer_budget_exceeded,
    "OVERLOADED": overloaded,
    "QUEUE_FULL": queue_full,
    "CLIENT_QUEUE_FULL": client_queue_full,
    "NO_REPLICA": no_replica,
    "REPLICAS_BUSY": replicas_busy,
    "DATABASE_UNAVAILABLE": database_unavailable,
    "API_KEY_MISSING": lambda w: refused("HashService.ComputeHash", _hash_on(w, ())),
    "API_KEY_INVALID": lambda w: refused(
        "HashService.ComputeHash", _hash_on(w, (("x-api-key", "hm_wrong"),))
    ),
    "ADMIN_TOKEN_MISSING": lambda w: refused("AdminService.GetStats", _stats_on(w.guarded)),
    "ADMIN_TOKEN_INVALID": admin_token_invalid,
    "ADMIN_LISTENER_ONLY": lambda w: refused("AdminService.GetStats", _stats_on(w.main)),
    "DEADLINE_PASSED": deadline_passed,
    "UNIMPLEMENTED": unimplemented,
}


# -- checking what the client saw -------------------------------------------------------------


def address_of(channel: grpc.Channel) -> str:
    return ADDRESSES[id(channel)]


ADDRESSES: dict[int, str] = {}


def status_of(error: grpc.RpcError) -> status_pb2.Status | None:
    raw = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")  # type: ignore[attr-defined]
    return status_pb2.Status.FromString(raw) if raw else None


def detail(error: grpc.RpcError, kind: type) -> object:
    status = status_of(error)
    assert status is not None, "no grpc-status-details-bin"
    for packed in status.details:
        if packed.Is(kind.DESCRIPTOR):  # type: ignore[attr-defined]
            message = kind()
            packed.Unpack(message)
            return message
    raise AssertionError(f"no {kind.__name__} in the details")


def check(entry: Entry, method: str, error: grpc.RpcError) -> None:
    code = error.code()  # type: ignore[attr-defined]
    assert code.name == entry.code, (entry.name, code, error)
    assert not method or method in entry.methods, (entry.name, method)
    status = status_of(error)
    if entry.name == "DEADLINE_PASSED" and status is None:
        return  # the client's own deadline fired first: the library's status, no details
    if not entry.has_error_info:
        assert status is None, (entry.name, "gRPC's own answers carry no details")
        return
    assert status is not None, entry.name
    names = [packed.type_url.rsplit(".", 1)[1] for packed in status.details]
    assert names == list(entry.details), (entry.name, names)
    info = detail(error, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == (entry.name, DOMAIN)  # type: ignore[attr-defined]
    if entry.retry in (Retry.AFTER_DELAY, Retry.NOT_SENT):
        trailers = dict(error.trailing_metadata())  # type: ignore[attr-defined]
        assert int(trailers["retry-after"]) >= 1 and int(trailers["grpc-retry-pushback-ms"]) >= 1
        assert detail(error, error_details_pb2.RetryInfo).retry_delay.ToNanoseconds() > 0  # type: ignore[attr-defined]


@pytest.fixture
def world(
    dsn: str, procs: Processes, owned_pg: EmbeddedPostgres, tmp_path: Path
) -> Iterator[World]:
    small = {"HASHMESH_MAX_MESSAGE_BYTES": str(LIMIT)}
    replica_a = procs.hashd(
        dsn, env={**small, "HASHMESH_HASHD_CPU_WORKERS": "1", "HASHMESH_HASHD_CPU_QUEUE": "0"}
    )
    procs.workerd(dsn)
    balancer_a = procs.balancer([replica_a.address], env=small)
    replica_c = procs.hashd(
        owned_pg.dsn,
        env={
            "HASHMESH_MAX_PENDING_TASKS": "4",
            "HASHMESH_MAX_PENDING_PER_CLIENT": "2",
            "HASHMESH_TASK_KEY_FILE": "",
        },
    )  # no task input key: argon2id tasks are refused
    alice, bob = generate_key(), generate_key()
    keys = tmp_path / "keys"
    keys.write_text(f"{key_line('alice', alice)}\n{key_line('bob', bob)}\n")
    balancer_b = procs.balancer(
        [replica_c.address],
        env={
            "HASHMESH_BALANCER_API_KEYS_FILE": str(keys),
            "HASHMESH_ADMIN_TOKEN": TOKEN,
            "HASHMESH_BALANCER_MAX_IN_FLIGHT": "1",
            "HASHMESH_BALANCER_MAX_STREAMS_PER_BACKEND": "1",
        },
    )
    balancer_d = procs.balancer(
        [replica_a.address],
        env={
            "HASHMESH_BALANCER_API_KEYS_FILE": str(keys),
            "HASHMESH_BALANCER_PEER_UPLOAD_STREAMS": "1",
            "HASHMESH_BALANCER_TOTAL_UPLOAD_STREAMS": "2",
        },
    )
    budgeted = grpc.insecure_channel(balancer_d.addresses["balancer"])
    main = grpc.insecure_channel(balancer_a.addresses["balancer"])
    ADDRESSES[id(main)] = balancer_a.addresses["balancer"]
    guarded = grpc.insecure_channel(balancer_b.addresses["balancer"])
    admin = grpc.insecure_channel(balancer_a.addresses["balancer admin"])
    try:
        yield World(
            main,
            admin_pb2_grpc.AdminServiceStub(admin),
            guarded,
            (("x-api-key", alice),),
            (("x-api-key", bob),),
            owned_pg,
            replica_a.address,
            budgeted,
        )
    finally:
        for channel in (main, guarded, admin, budgeted):
            channel.close()
        ADDRESSES.pop(id(main), None)


@pytest.mark.timeout(300)
def test_every_catalogue_entry_is_provoked_and_answers_as_documented(world: World) -> None:
    names = [e.name for e in CATALOGUE]
    assert sorted(PROVOKE) == sorted(set(names) - set(CANNOT_PROVOKE)), (
        "each entry needs a provocation"
    )
    order = [e for e in CATALOGUE if e.name not in LAST] + [e for e in CATALOGUE if e.name in LAST]
    checked = []
    for entry in order:
        if entry.name in CANNOT_PROVOKE:
            continue
        method, error = PROVOKE[entry.name](world)
        check(entry, method, error)
        checked.append(entry.name)
    assert len(checked) == len(CATALOGUE) - len(CANNOT_PROVOKE)
