"""What a task computes: pure functions over a claimed task (no I/O)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from hashmesh.core import hashing
from hashmesh.core.hashing import Algorithm


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


def describe_error(exc: BaseException) -> str:
    """A short, input-free description of a failed attempt for ``last_error``."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__
