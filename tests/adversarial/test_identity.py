"""Issue 10, played as the attacker against real processes: who is calling is decided by the
balancer, replicas believe only its signed stamp, and one tenant can neither see, change nor
capture another's tasks. Each test prints the figure the closing note quotes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.balancer import keys
from hashmesh.core.identity import Stamper
from hashmesh.v1 import (
    cache_pb2,
    cache_pb2_grpc,
    common_pb2,
    hash_pb2,
    task_pb2,
    task_pb2_grpc,
)
from tests.cli_helpers import hashctl
from tests.conftest import Processes
from tests.integration.test_balancer_proxy import start_backends, start_balancer
from tests.source_relay import SourceRelay
from tests.stamps import channel_as, stamp

HASH = "/hashmesh.v1.HashService/Hash"
HASH_REQUEST = hash_pb2.HashRequest(
    algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"
).SerializeToString()
MD5 = common_pb2.ALGORITHM_MD5
ADMIN_TOKEN = "operator-token-for-tests"


def md5_spec(data: bytes, **fields: Any) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(algorithm=MD5, data=data, **fields)


def refused(call: Any, *args: Any, **kwargs: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        result = call(*args, **kwargs)
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)  # a stream fails on its first read
    return caught.value


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


# -- the rate limit keys on the peer, not on what it says ----------------------------------


async def _flood(
    address: str, total: int, metadata_for: Any, concurrency: int = 64
) -> tuple[int, float]:
    """``total`` Hash calls as fast as ``concurrency`` allows; (admitted, seconds from the
    first send to the last answer)."""
    admitted = 0
    sent = iter(range(total))
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(HASH)

        async def worker() -> None:
            nonlocal admitted
            for index in sent:
                try:
                    await call(HASH_REQUEST, timeout=20, metadata=metadata_for(index))
                    admitted += 1
                except grpc.aio.AioRpcError as err:
                    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED, err

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return admitted, time.monotonic() - started


def test_rotating_or_borrowed_client_ids_get_one_peers_limit(tmp_path: Path) -> None:
    rate, burst, total = 50, 50, 800
    backends = start_backends(tmp_path, 1)
    # 127.0.0.1 (where this test's own proxy-like calls come from) is trusted; the attacker's
    # 127.0.0.2 is not, whatever it claims.
    balancer = start_balancer(
        tmp_path,
        backends,
        "--rate-limit",
        f"{rate}/{burst}",
        env={
            "HASHMESH_BALANCER_RATE_LIMIT_OVERRIDES": "vip=100000/100000",
            "HASHMESH_BALANCER_TRUSTED_PROXIES": "127.0.0.1/32",
        },
    )
    try:
        with (
            SourceRelay("127.0.0.2", balancer.addresses["balancer"]) as attacker,
            SourceRelay("127.0.0.3", balancer.addresses["balancer"]) as victim,
        ):
            # Every call claims a new id, now and then the override's or the victim's.
            claims = lambda i: (("x-client-id", ("vip", "ip:127.0.0.3", f"rotating-{i}")[i % 3]),)  # noqa: E731
            admitted, elapsed = asyncio.run(_flood(attacker.address, total, claims))
            # The client's interval contains the balancer's, so this bound only grows with load.
            bound = 1.1 * (rate * elapsed + burst)
            print(
                f"\nrotating x-client-id: {admitted} of {total} admitted in {elapsed:.2f}s "
                f"(limit {rate}/s, burst {burst}: bound {bound:.0f})"
            )
            assert burst <= admitted <= bound
            # The victim, whose identity the attacker borrowed, still has its whole burst.
            victim_ok, _ = asyncio.run(_flood(victim.address, 20, lambda i: (), concurrency=1))
            assert victim_ok == 20
        # The same claim from the trusted range is believed: that is what the setting is for.
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            _, call = channel.unary_unary(HASH).with_call(
                HASH_REQUEST, timeout=10, metadata=[("x-client-id", "vip")]
            )
        # Far from exhaustion the RateLimit fields ride the trailers only.
        assert dict(call.trailing_metadata())["ratelimit-policy"].startswith('"client";q=100000;')
    finally:
        balancer.terminate()
        for backend in backends:
            backend.terminate()


# -- a replica believes the balancer's stamp only ------------------------------------------


@pytest.fixture
def replica(dsn: str, procs: Processes) -> str:
    return procs.hashd(dsn, env={"HASHMESH_ADMIN_TOKEN": ADMIN_TOKEN}).address


def test_forged_identity_sent_straight_to_a_replica_gains_nothing(replica: str) -> None:
    with channel_as(replica, "bob") as as_bob:
        bobs = (
            task_pb2_grpc.TaskServiceStub(as_bob)
            .SubmitTask(task_pb2.SubmitTaskRequest(spec=md5_spec(b"bob's data")), timeout=10)
            .task
        )
    assert bobs.client_id == "bob"
    forged = [
        ("x-hashmesh-identity", "bob"),
        ("x-client-id", "bob"),
        ("x-forwarded-for", "10.0.0.1"),
    ]
    with grpc.insecure_channel(replica) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        # Unsigned claims are not read: the caller is its own address, and bob's task is missing.
        error = refused(
            tasks.GetTask, task_pb2.GetTaskRequest(id=bobs.id), timeout=10, metadata=forged
        )
        assert error.code() is grpc.StatusCode.NOT_FOUND
        mine = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"x")), timeout=10, metadata=forged
        )
        assert mine.task.client_id == "ip:127.0.0.1"
        assert [
            t.id
            for t in tasks.ListTasks(task_pb2.ListTasksRequest(), timeout=10, metadata=forged).tasks
        ] == [mine.task.id]
        for request in (task_pb2.ListTasksRequest(client_id="bob"),):
            assert (
                refused(tasks.ListTasks, request, timeout=10).code()
                is grpc.StatusCode.PERMISSION_DENIED
            )
        body = task_pb2.SubmitTaskRequest(spec=md5_spec(b"x"), client_id="bob")
        assert (
            refused(tasks.SubmitTask, body, timeout=10).code() is grpc.StatusCode.PERMISSION_DENIED
        )
        # Signatures that do not verify are refused outright.
        wrong_secret = Stamper("not-the-mesh-secret-at-all").stamp(
            "bob", "/hashmesh.v1.TaskService/GetTask"
        )
        replayed = stamp("bob", "GetTask")  # a genuine stamp, but for another method
        operator_claim = (
            ("x-hashmesh-identity", "bob"),
            ("x-hashmesh-identity-sig", "v1;operator;9999999999;00"),
        )
        for metadata, method, request in (
            (wrong_secret, tasks.GetTask, task_pb2.GetTaskRequest(id=bobs.id)),
            (replayed, tasks.CancelTask, task_pb2.CancelTaskRequest(id=bobs.id)),
            (operator_claim, tasks.ListTasks, task_pb2.ListTasksRequest()),
        ):
            assert (
                refused(method, request, timeout=10, metadata=metadata).code()
                is grpc.StatusCode.UNAUTHENTICATED
            )
        # Internals and shared state: operators only; the operator is who holds the token.
        cache = cache_pb2_grpc.CacheServiceStub(channel)
        error = refused(cache.ClearCache, cache_pb2.ClearCacheRequest(), timeout=10)
        assert error.code() is grpc.StatusCode.PERMISSION_DENIED
        assert cache.GetCacheStats(cache_pb2.GetCacheStatsRequest(), timeout=10).replica == ""
        wrong = [("authorization", "Bearer guess")]
        assert (
            refused(
                cache.ClearCache, cache_pb2.ClearCacheRequest(), timeout=10, metadata=wrong
            ).code()
            is grpc.StatusCode.UNAUTHENTICATED
        )
        cache.ClearCache(
            cache_pb2.ClearCacheRequest(),
            timeout=10,
            metadata=[("authorization", f"bearer {ADMIN_TOKEN}")],
        )
        every = tasks.ListTasks(
            task_pb2.ListTasksRequest(),
            timeout=10,
            metadata=[("authorization", f"BEARER {ADMIN_TOKEN}")],
        )
        assert {t.id for t in every.tasks} == {bobs.id, mine.task.id}
    with grpc.insecure_channel(replica) as channel:  # bob's task is still pending and his
        still = task_pb2_grpc.TaskServiceStub(channel).GetTask(
            task_pb2.GetTaskRequest(id=bobs.id),
            timeout=10,
            metadata=[("authorization", f"Bearer {ADMIN_TOKEN}")],
        )
    assert still.task.status == task_pb2.TASK_STATUS_PENDING and still.task.client_id == "bob"


# -- tenants with API keys through the balancer --------------------------------------------


@pytest.fixture
def keyed_mesh(dsn: str, procs: Processes, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """One hashd behind a balancer with API keys for alice and bob (no workerd: tasks stay
    pending, so every transition below is decided by the caller alone)."""
    alice, bob = keys.generate_key(), keys.generate_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{keys.key_line('alice', alice)}\n{keys.key_line('bob', bob)}\n")
    env = {"HASHMESH_ADMIN_TOKEN": ADMIN_TOKEN}
    hashd = procs.hashd(dsn, env=env)
    balancer = procs.balancer([hashd.address], "--api-keys-file", str(keys_file), env=env)
    yield balancer.addresses["balancer"], {"alice": alice, "bob": bob}


def test_alice_cannot_reach_bobs_tasks_through_the_mesh(
    keyed_mesh: tuple[str, dict[str, str]],
) -> None:
    address, api_keys = keyed_mesh
    as_alice = [("x-api-key", api_keys["alice"])]
    as_bob = [("x-api-key", api_keys["bob"])]
    with grpc.insecure_channel(address) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        # Idempotency capture: alice submits first under the key bob is about to use.
        alices = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"alice", idempotency_key="bob-1")),
            timeout=10,
            metadata=as_alice,
        ).task
        bobs = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"bob", idempotency_key="bob-1")),
            timeout=10,
            metadata=as_bob,
        )
        assert bobs.created and bobs.task.id != alices.id and bobs.task.client_id == "bob"
        done = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"bob-done")), timeout=10, metadata=as_bob
        )
        tasks.CancelTask(task_pb2.CancelTaskRequest(id=done.task.id), timeout=10, metadata=as_bob)
        bob_ids = {bobs.task.id, done.task.id}

        attempts = 0
        # Body id, with alice's key, and with claims a proxy would send (not believed from her).
        for metadata in (
            as_alice,
            [*as_alice, ("x-client-id", "bob"), ("x-hashmesh-identity", "bob")],
        ):
            for request in (task_pb2.SubmitTaskRequest(spec=md5_spec(b"x"), client_id="bob"),):
                attempts += 1
                assert (
                    refused(tasks.SubmitTask, request, timeout=10, metadata=metadata).code()
                    is grpc.StatusCode.PERMISSION_DENIED
                )
            attempts += 1
            assert (
                refused(
                    tasks.ListTasks,
                    task_pb2.ListTasksRequest(client_id="bob"),
                    timeout=10,
                    metadata=metadata,
                ).code()
                is grpc.StatusCode.PERMISSION_DENIED
            )
            listed = tasks.ListTasks(
                task_pb2.ListTasksRequest(), timeout=10, metadata=metadata
            ).tasks
            assert {t.id for t in listed} == {alices.id}
            for task_id in bob_ids:
                for method, request in (
                    (tasks.GetTask, task_pb2.GetTaskRequest(id=task_id)),
                    (tasks.WatchTask, task_pb2.WatchTaskRequest(id=task_id)),
                    (tasks.CancelTask, task_pb2.CancelTaskRequest(id=task_id)),
                    (tasks.RequeueTask, task_pb2.RequeueTaskRequest(id=task_id)),
                ):
                    attempts += 1
                    error = refused(method, request, timeout=10, metadata=metadata)
                    # Exactly what a task that does not exist answers: no existence leak.
                    assert error.code() is grpc.StatusCode.NOT_FOUND
                    assert error.details() == f"task {task_id} not found"
        missing = str(uuid.uuid4())
        assert (
            refused(
                tasks.GetTask, task_pb2.GetTaskRequest(id=missing), timeout=10, metadata=as_alice
            ).details()
            == f"task {missing} not found"
        )
        print(f"\nalice against bob's tasks: {attempts} of {attempts} attempts refused or scoped")

        # Bob's tasks are as he left them; the operator (any case of "Bearer") sees both tenants.
        operator = [("authorization", f"bearer {ADMIN_TOKEN}")]
        every = tasks.ListTasks(task_pb2.ListTasksRequest(), timeout=10, metadata=operator).tasks
        assert {t.id: t.client_id for t in every} == {
            alices.id: "alice",
            **dict.fromkeys(bob_ids, "bob"),
        }
        statuses = {t.id: t.status for t in every}
        assert statuses[bobs.task.id] == task_pb2.TASK_STATUS_PENDING
        assert statuses[done.task.id] == task_pb2.TASK_STATUS_CANCELLED
        only_bob = tasks.ListTasks(
            task_pb2.ListTasksRequest(client_id="bob"), timeout=10, metadata=operator
        ).tasks
        assert {t.id for t in only_bob} == bob_ids
        assert (
            refused(
                tasks.ListTasks,
                task_pb2.ListTasksRequest(),
                timeout=10,
                metadata=[("authorization", "Bearer wrong")],
            ).code()
            is grpc.StatusCode.UNAUTHENTICATED
        )

        cache = cache_pb2_grpc.CacheServiceStub(channel)
        assert (
            refused(
                cache.ClearCache, cache_pb2.ClearCacheRequest(), timeout=10, metadata=as_alice
            ).code()
            is grpc.StatusCode.PERMISSION_DENIED
        )
        cache.ClearCache(cache_pb2.ClearCacheRequest(), timeout=10, metadata=operator)
        stats = tasks.GetQueueStats(task_pb2.GetQueueStatsRequest(), timeout=10, metadata=as_alice)
        assert not stats.workers


def test_reused_idempotency_key_with_another_request_is_refused(
    keyed_mesh: tuple[str, dict[str, str]],
) -> None:
    address, api_keys = keyed_mesh
    as_alice = [("x-api-key", api_keys["alice"])]
    with grpc.insecure_channel(address) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        first = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"a", idempotency_key="k")),
            timeout=10,
            metadata=as_alice,
        )
        again = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"a", idempotency_key="k")),
            timeout=10,
            metadata=as_alice,
        )
        assert first.created and not again.created and again.task.id == first.task.id
        others = [
            md5_spec(b"b", idempotency_key="k"),
            task_pb2.TaskSpec(
                algorithm=common_pb2.ALGORITHM_SHA256, data=b"a", idempotency_key="k"
            ),
            md5_spec(b"a", idempotency_key="k", priority=5),
        ]
        for spec in others:
            error = refused(
                tasks.SubmitTask,
                task_pb2.SubmitTaskRequest(spec=spec),
                timeout=10,
                metadata=as_alice,
            )
            assert error.code() is grpc.StatusCode.ALREADY_EXISTS and "'k'" in (
                error.details() or ""
            )
            info = error_info(error)
            assert info is not None and info.reason == "IDEMPOTENCY_KEY_REUSED"
            assert dict(info.metadata) == {"idempotency_key": "k", "task_id": first.task.id}
        # In one batch: refused whole, nothing stored.
        batch = task_pb2.SubmitTasksRequest(
            specs=[md5_spec(b"new"), md5_spec(b"b", idempotency_key="k")]
        )
        error = refused(tasks.SubmitTasks, batch, timeout=10, metadata=as_alice)
        assert error.code() is grpc.StatusCode.ALREADY_EXISTS
        twice = task_pb2.SubmitTasksRequest(
            specs=[md5_spec(b"1", idempotency_key="j"), md5_spec(b"2", idempotency_key="j")]
        )
        assert (
            refused(tasks.SubmitTasks, twice, timeout=10, metadata=as_alice).code()
            is grpc.StatusCode.INVALID_ARGUMENT
        )
        listed = tasks.ListTasks(task_pb2.ListTasksRequest(), timeout=10, metadata=as_alice).tasks
        assert [t.id for t in listed] == [first.task.id]
        print(f"\nreused key with another request: {len(others) + 1} of {len(others) + 1} refused")


def test_keys_are_forgotten_after_the_window_and_fingerprints_hold_no_input(
    dsn: str, replica: str
) -> None:
    secret_input = b"correct horse battery staple"
    spec = md5_spec(secret_input, idempotency_key="w")
    with channel_as(replica, "carol") as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        first = tasks.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10).task
        with psycopg.connect(dsn) as conn:
            [(fingerprint,)] = conn.execute(
                "SELECT idempotency_fingerprint FROM hashmesh_tasks"
            ).fetchall()
            # A keyed MAC, not the input or a bare digest of it.
            assert len(fingerprint) == 40 and secret_input not in bytes(fingerprint)
            assert all(
                hashlib.new(name, secret_input).digest() not in bytes(fingerprint)
                for name in ("md5", "sha1", "sha256")
            )
            # Older than the window (24 h by default): as if it had been created two days ago.
            conn.execute("UPDATE hashmesh_tasks SET created_at = now() - interval '2 days'")
        later = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=md5_spec(b"other", idempotency_key="w")), timeout=10
        )
        assert later.created and later.task.id != first.id
        old = tasks.GetTask(task_pb2.GetTaskRequest(id=first.id), timeout=10).task
        assert old.idempotency_key == "" and old.status == task_pb2.TASK_STATUS_PENDING


def test_hashctl_sends_its_api_key(keyed_mesh: tuple[str, dict[str, str]]) -> None:
    address, api_keys = keyed_mesh
    anonymous = hashctl("--target", address, "hash", "sha256", "abc")
    assert anonymous.exit_code == 8 and "UNAUTHENTICATED" in anonymous.stderr
    result = hashctl(
        "--target", address, "--api-key", api_keys["alice"], "--json", "submit", "md5", "abc"
    )
    assert result.exit_code == 0, result.stderr
    submitted = json.loads(result.stdout)
    assert submitted["client_id"] == "alice"
    for key, expected in ((api_keys["bob"], []), (api_keys["alice"], [submitted["id"]])):
        listed = hashctl(
            "--target", address, "--json", "task", "list", env={"HASHMESH_API_KEY": key}
        )
        assert listed.exit_code == 0, listed.stderr
        assert [t["id"] for t in json.loads(listed.stdout)["tasks"]] == expected


@pytest.mark.parametrize("daemon", ["hashmesh.hashd", "hashmesh.balancer"])
def test_daemons_refuse_to_start_without_the_identity_secret(daemon: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "HASHMESH_IDENTITY_SECRET"}
    args = (
        ["--database-url", "postgresql://unused/x"]
        if daemon.endswith("hashd")
        else ["--backends", "127.0.0.1:1"]
    )
    run = subprocess.run(
        [sys.executable, "-m", daemon, "--listen", "127.0.0.1:0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "HASHMESH_IDENTITY_SECRET is not set" in run.stderr
    assert "Traceback" not in run.stderr
    short = {**env, "HASHMESH_IDENTITY_SECRET": "short"}
    run = subprocess.run(
        [sys.executable, "-m", daemon, "--listen", "127.0.0.1:0", *args],
        env=short,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode != 0 and "at least 16 characters" in run.stderr
