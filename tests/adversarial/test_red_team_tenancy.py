"""Red team (issue 10): what one tenant can learn of another's secrets through shared state.

The result cache is keyed by an HMAC of (algorithm, parameters, input); if the key did not
also name the tenant, an argon2id answer with a known salt would tell any other tenant —
instantly, by ``cached: true`` or by its speed — that somebody hashed exactly this password:
a password-confirmation oracle across tenants."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from hashmesh.balancer import keys
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc
from tests.conftest import Processes

ARGON2ID = common_pb2.ALGORITHM_ARGON2ID
# Salts are not secret (they sit next to the hash they made); the password is.
KNOWN_SALT = b"bob's-user-record-salt"
PASSWORD = b"correct horse battery staple"
CHEAP = common_pb2.Argon2Params(
    time_cost=1, memory_cost_kib=8 * 1024, parallelism=1, salt=KNOWN_SALT
)


@pytest.fixture
def tenants(
    dsn: str, procs: Processes, tmp_path: Path, task_key_file: Path
) -> Iterator[tuple[str, dict[str, list[tuple[str, str]]]]]:
    """hashd, workerd and a balancer with API keys for alice and bob; the cache as shipped
    (argon2id with a caller's salt)."""
    alice, bob = keys.generate_key(), keys.generate_key()
    keys_file = tmp_path / "keys"
    keys_file.write_text(f"{keys.key_line('alice', alice)}\n{keys.key_line('bob', bob)}\n")
    env = {"HASHMESH_TASK_KEY_FILE": str(task_key_file)}
    hashd = procs.hashd(dsn, env=env)
    procs.workerd(dsn, env=env)
    balancer = procs.balancer([hashd.address], "--api-keys-file", str(keys_file))
    yield (
        balancer.addresses["balancer"],
        {"alice": [("x-api-key", alice)], "bob": [("x-api-key", bob)]},
    )


def _hash(
    channel: grpc.Channel, metadata: list[tuple[str, str]], data: bytes
) -> common_pb2.HashResult:
    request = hash_pb2.HashRequest(algorithm=ARGON2ID, data=data, argon2=CHEAP)
    return (
        hash_pb2_grpc.HashServiceStub(channel).Hash(request, timeout=30, metadata=metadata).result
    )


def _cached_soon(channel: grpc.Channel, metadata: list[tuple[str, str]], data: bytes) -> bool:
    """Whether a repeat of ``data`` is answered from the cache within 30 s (a miss computes
    and stores it, so the next repeat finds it however the first store went)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if _hash(channel, metadata, data).cached:
            return True
        time.sleep(0.05)
    return False


def _finished(
    tasks: task_pb2_grpc.TaskServiceStub, task_id: str, metadata: list[tuple[str, str]]
) -> task_pb2.Task:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        task = tasks.GetTask(
            task_pb2.GetTaskRequest(id=task_id), timeout=10, metadata=metadata
        ).task
        if task.status == task_pb2.TASK_STATUS_SUCCEEDED:
            return task
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} did not finish")


def test_the_result_cache_does_not_confirm_another_tenants_password(
    tenants: tuple[str, dict[str, list[tuple[str, str]]]],
) -> None:
    address, who = tenants
    with grpc.insecure_channel(address) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        # Bob hashes his password, once directly and once as a task (workerd stores that one).
        bobs = _hash(channel, who["bob"], PASSWORD)
        spec = task_pb2.TaskSpec(algorithm=ARGON2ID, data=PASSWORD + b"!", argon2=CHEAP)
        bobs_task = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=spec), timeout=10, metadata=who["bob"]
        ).task
        _finished(tasks, bobs_task.id, who["bob"])
        # Bob's own repeats are still served from the cache: it works, per tenant. workerd
        # writes its entry after the task's completion commits, and a busy machine can make
        # that write (or hashd's read of it) miss the shared tier's timeout: wait for the entry.
        assert _hash(channel, who["bob"], PASSWORD).cached
        assert _cached_soon(channel, who["bob"], PASSWORD + b"!")

        # Alice, knowing the salt, tries guesses: a wrong one and the right ones.
        assert not _hash(channel, who["alice"], b"Tr0ub4dor&3").cached
        guessed = _hash(channel, who["alice"], PASSWORD)
        assert not guessed.cached, "the cache confirmed bob's password to alice"
        assert guessed.encoded == bobs.encoded  # the same answer, computed for her
        again = tasks.SubmitTask(
            task_pb2.SubmitTaskRequest(spec=spec), timeout=10, metadata=who["alice"]
        ).task
        assert again.status == task_pb2.TASK_STATUS_PENDING and not again.result.cached, (
            "a task answered at once from bob's cache entry confirmed his password to alice"
        )
        assert not _finished(tasks, again.id, who["alice"]).result.cached
