"""The identity stamp, the replica's reading of a caller, tenancy and idempotency rules on the
in-memory store: pure logic, injected clocks, no sockets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hashmesh.cli.supervisor import IDENTITY_SECRET_FILE, load_cache_secret
from hashmesh.core.errors import NotFound, PermissionDenied, Unauthenticated
from hashmesh.core.identity import (
    IDENTITY,
    IDENTITY_SIG,
    STAMP_BUCKET,
    STAMP_TTL,
    Caller,
    Stamper,
    StampError,
    bearer_token,
    host_of,
    verify,
)
from hashmesh.core.queue.idempotency import Fingerprinter, IdempotencyKeyReused
from hashmesh.core.queue.memory import MemoryTaskStore
from hashmesh.core.queue.model import NewTask
from hashmesh.hashd.config import HashdSettings
from hashmesh.hashd.identity import CallerResolver, acting_as
from hashmesh.hashd.task_service import TaskService
from hashmesh.v1 import common_pb2, task_pb2

SECRET = "unit-test-identity-secret"
METHOD = "/hashmesh.v1.TaskService/GetTask"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_a_stamp_verifies_for_its_method_until_it_expires() -> None:
    clock = Clock()
    (_, identity), (_, signature) = Stamper(SECRET, clock=clock).stamp("alice", METHOD)
    assert verify(SECRET, identity, signature, METHOD, clock.now) == Caller("alice")
    # Valid at least STAMP_TTL seconds, at most TTL + one bucket.
    assert verify(SECRET, identity, signature, METHOD, clock.now + STAMP_TTL) == Caller("alice")
    with pytest.raises(StampError, match="expired"):
        verify(SECRET, identity, signature, METHOD, clock.now + STAMP_TTL + STAMP_BUCKET + 1)
    for args in (
        ("mallory", signature, METHOD),  # another identity
        (identity, signature, "/hashmesh.v1.CacheService/ClearCache"),  # another method
        (identity, signature.replace(";client;", ";operator;"), METHOD),  # promoted role
    ):
        with pytest.raises(StampError, match="does not verify"):
            verify(SECRET, *args, clock.now)
    with pytest.raises(StampError, match="does not verify"):
        verify("another-secret-entirely", identity, signature, METHOD, clock.now)
    with pytest.raises(StampError, match="malformed"):
        verify(SECRET, identity, "v1;root;1;00", METHOD, clock.now)
    # A stamp signed far ahead (a leaked key would make one that lives forever) is refused.
    (_, _), (_, far) = Stamper(SECRET, clock=Clock(clock.now + 10_000)).stamp("alice", METHOD)
    with pytest.raises(StampError, match="too far ahead"):
        verify(SECRET, "alice", far, METHOD, clock.now)


def test_stamps_are_signed_once_per_bucket_and_operator_is_a_role() -> None:
    clock = Clock()
    stamper = Stamper(SECRET, clock=clock)
    first = stamper.stamp("alice", METHOD)
    assert stamper.stamp("alice", METHOD) is first
    operator = stamper.stamp("alice", METHOD, operator=True)
    assert operator != first
    assert verify(SECRET, "alice", operator[1][1], METHOD, clock.now).operator
    clock.now += STAMP_BUCKET
    assert stamper.stamp("alice", METHOD) != first


def test_the_replica_reads_the_stamp_or_the_peer_never_a_claim() -> None:
    clock = Clock()
    resolver = CallerResolver(SECRET, "tok", clock=clock)
    stamped = Stamper(SECRET, clock=clock).stamp("bob", METHOD)
    assert resolver.resolve(METHOD, "ipv4:10.0.0.1:5", stamped) == Caller("bob")
    claims = [(IDENTITY, "bob"), ("x-client-id", "bob")]
    assert resolver.resolve(METHOD, "ipv4:10.0.0.1:5", claims) == Caller("ip:10.0.0.1")
    assert resolver.resolve(METHOD, "ipv6:[::1]:5", [("authorization", "bEaReR tok")]) == Caller(
        "ip:::1", True
    )
    for metadata in (
        [(IDENTITY, "bob"), (IDENTITY_SIG, "v1;operator;1;00")],
        [("authorization", "Bearer guess")],
        [(IDENTITY_SIG, b"\x00")],
    ):
        with pytest.raises(Unauthenticated):
            resolver.resolve(METHOD, "ipv4:10.0.0.1:5", metadata)
    with pytest.raises(Unauthenticated, match="no HASHMESH_IDENTITY_SECRET"):
        CallerResolver("", "").resolve(METHOD, "ipv4:10.0.0.1:5", stamped)
    # Without an admin token nobody is an operator by header.
    assert (
        not CallerResolver(SECRET, "")
        .resolve(METHOD, "ipv4:1.2.3.4:1", [("authorization", "Bearer x")])
        .operator
    )


def test_bearer_scheme_and_peer_host_parsing() -> None:
    assert bearer_token([("authorization", "Bearer abc")]) == "abc"
    assert bearer_token([("authorization", "bearer  abc ")]) == "abc"
    assert bearer_token([("authorization", "Basic abc")]) == ""
    assert bearer_token([("authorization", "Bearer")]) == ""
    assert bearer_token([("x-other", "Bearer abc")]) is None
    assert host_of("ipv4:127.0.0.2:5000") == "127.0.0.2"
    assert host_of("ipv6:[2001:db8::1]:5000") == "2001:db8::1"
    assert host_of("unix:/tmp/sock") == "unix:/tmp/sock"


def test_fingerprints_tell_requests_apart_under_a_key() -> None:
    one, other = Fingerprinter("secret-one-0123456789"), Fingerprinter("secret-two-0123456789")
    task = NewTask("md5", b"hunter2", idempotency_key="k")
    assert one.same_request(
        one.of(task), one.of(NewTask("md5", b"hunter2", idempotency_key="other"))
    )
    for changed in (
        NewTask("md5", b"hunter3"),
        NewTask("sha1", b"hunter2"),
        NewTask("md5", b"hunter2", priority=1),
        NewTask("md5", b"hunter2", max_attempts=2),
        NewTask("md5", b"hunter2", params={"salt": "x"}),
    ):
        assert not one.same_request(one.of(task), one.of(changed))
    # Made under another key (before a secret rotation): cannot be compared, taken as the same.
    assert one.same_request(other.of(task), one.of(NewTask("md5", b"different")))
    assert b"hunter2" not in one.of(task)


def _service(store: MemoryTaskStore, window: float = 3600.0) -> TaskService:
    return TaskService(
        store, HashdSettings(identity_secret=SECRET, idempotency_window_seconds=window)
    )


def _spec(data: bytes, key: str = "") -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=data, idempotency_key=key)


def test_tenants_are_scoped_and_keys_are_per_caller_and_windowed() -> None:
    now = [datetime(2026, 1, 1, tzinfo=UTC)]
    store = MemoryTaskStore(lambda: now[0])
    service = _service(store)
    alice, bob, operator = Caller("alice"), Caller("bob"), Caller("ip:10.0.0.9", operator=True)

    async def submit(
        caller: Caller, spec: task_pb2.TaskSpec, client_id: str = ""
    ) -> task_pb2.SubmitTaskResponse:
        with acting_as(caller):
            return await service.SubmitTask(
                task_pb2.SubmitTaskRequest(spec=spec, client_id=client_id), None
            )  # type: ignore[arg-type]

    async def body() -> None:
        alices = await submit(alice, _spec(b"a", "shared-key"))
        bobs = await submit(bob, _spec(b"b", "shared-key"))  # same key, own namespace
        assert bobs.created and bobs.task.client_id == "bob" and bobs.task.id != alices.task.id
        with pytest.raises(PermissionDenied):
            await submit(alice, _spec(b"x"), client_id="bob")
        assert (await submit(alice, _spec(b"x"), client_id="alice")).task.client_id == "alice"
        for owner, visible in (("alice", True), ("bob", False), (None, True)):
            if visible:
                assert (await store.get(alices.task.id, owner=owner)).id == alices.task.id
            else:
                with pytest.raises(NotFound, match=f"task {alices.task.id} not found"):
                    await store.get(alices.task.id, owner=owner)
                with pytest.raises(NotFound):
                    await store.cancel(alices.task.id, owner=owner)
                with pytest.raises(NotFound):
                    await store.requeue(alices.task.id, owner=owner)
        with acting_as(bob):
            listed = await service.ListTasks(task_pb2.ListTasksRequest(), None)  # type: ignore[arg-type]
            assert [t.id for t in listed.tasks] == [bobs.task.id]
            with pytest.raises(PermissionDenied):
                await service.ListTasks(task_pb2.ListTasksRequest(client_id="alice"), None)  # type: ignore[arg-type]
        with acting_as(operator):
            everyone = await service.ListTasks(task_pb2.ListTasksRequest(), None)  # type: ignore[arg-type]
            assert len(everyone.tasks) == 3
        with pytest.raises(IdempotencyKeyReused) as reused:
            await submit(alice, _spec(b"other", "shared-key"))
        assert reused.value.task_id == alices.task.id and reused.value.key == "shared-key"
        assert not (await submit(alice, _spec(b"a", "shared-key"))).created
        now[0] += timedelta(seconds=3601)  # past the window: the key starts a new task
        fresh = await submit(alice, _spec(b"other", "shared-key"))
        assert fresh.created and fresh.task.id != alices.task.id
        assert (await store.get(alices.task.id, owner=None)).idempotency_key is None

    asyncio.run(body())


def test_hashctl_up_keeps_its_identity_secret_apart_and_private(tmp_path: Path) -> None:
    identity = load_cache_secret(tmp_path, IDENTITY_SECRET_FILE)
    assert (
        identity == load_cache_secret(tmp_path, IDENTITY_SECRET_FILE) != load_cache_secret(tmp_path)
    )
    assert len(identity) >= 32 and (tmp_path / IDENTITY_SECRET_FILE).stat().st_mode & 0o777 == 0o600
