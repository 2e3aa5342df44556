"""What a task computes: pure functions over a claimed task (no I/O)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hashmesh.core import hashing
from hashmesh.core.hashing import Algorithm
from hashmesh.core.sealing import KEY_FILE_ENV, TaskKeyring, UnknownKey
from hashmesh.core.tasks.model import ClaimedTask


class InjectedFailure(RuntimeError):
    """Raised for algorithms listed in ``HASHMESH_WORKERD_FAIL_ALGORITHMS`` (tests only)."""


def is_cpu_heavy(algorithm: str) -> bool:
    """Heavy tasks run in the worker's thread pool; digests run inline (microseconds)."""
    return algorithm == Algorithm.ARGON2ID.value


def compute(
    algorithm: str, data: bytes, params: dict[str, Any], *, fail: Collection[str] = ()
) -> tuple[bytes, str]:
    """(digest, encoded) of one task. Error messages never include the input."""
    if algorithm in fail:
        raise InjectedFailure(
            f"injected failure for {algorithm} (HASHMESH_WORKERD_FAIL_ALGORITHMS)"
        )
    parsed = Algorithm(algorithm)
    if parsed is Algorithm.ARGON2ID:
        return hashing.argon2id(data, hashing.Argon2Params.from_json(params))
    raw = hashing.digest(parsed, data)
    return raw, raw.hex()


def open_input(task: ClaimedTask, keyring: TaskKeyring | None) -> bytes:
    """The task's input in clear: unsealed when it was stored sealed."""
    if task.input_key_id is None:
        return task.data
    if keyring is None:
        raise UnknownKey(
            f"task input sealed with key {task.input_key_id!r}, and this workerd has no task "
            f"input keys ({KEY_FILE_ENV} is not set)"
        )
    return keyring.open(task.input_key_id, task.id, task.algorithm, task.params, task.data)


def run(
    task: ClaimedTask, keyring: TaskKeyring | None, *, fail: Collection[str] = ()
) -> tuple[bytes, str]:
    """Open the input right before hashing it; the clear input lives only in this call."""
    return compute(task.algorithm, open_input(task, keyring), task.params, fail=fail)


def describe_error(exc: BaseException) -> str:
    """A short, input-free description of a failed attempt for ``last_error``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
