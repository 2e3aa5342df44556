"""User-facing names of the wire enums (``sha256``, ``pending``, ``round_robin``) both ways."""

from __future__ import annotations

from hashmesh.cli.client import CliError, ExitCode
from hashmesh.core.errors import InvalidArgument
from hashmesh.core.hashing.algorithms import Algorithm
from hashmesh.core.hashing.wire import algorithm_from_name
from hashmesh.v1 import admin_pb2, cache_pb2, common_pb2, task_pb2

ALGORITHMS = [algorithm.value for algorithm in Algorithm]


def _short(full: str, prefix: str) -> str:
    return full[len(prefix) :].lower() if full.startswith(prefix) else full.lower()


def algorithm_name(value: int) -> str:
    return _short(common_pb2.Algorithm.Name(value), "ALGORITHM_")  # type: ignore[arg-type]


def parse_algorithm(name: str) -> common_pb2.Algorithm.ValueType:
    """A typed name as the wire enum, by the same rules as the server's (``algorithm_from_name``)."""
    try:
        return algorithm_from_name(name)
    except InvalidArgument:
        raise CliError(
            f"unknown algorithm {name!r}; expected one of {', '.join(ALGORITHMS)}",
            ExitCode.INVALID_ARGUMENT,
        ) from None


STATUSES = ["pending", "running", "retrying", "succeeded", "cancelled", "dead_letter"]


def status_name(value: int) -> str:
    return _short(task_pb2.TaskStatus.Name(value), "TASK_STATUS_")  # type: ignore[arg-type]


def _known_name(name: str, known: list[str], what: str) -> str:
    """``name`` as typed (any case, ``-`` or ``_``) when it is one of ``known``."""
    cleaned = name.strip().lower().replace("-", "_")
    if cleaned not in known:
        raise CliError(
            f"unknown {what} {name!r}; expected one of {', '.join(known)}",
            ExitCode.INVALID_ARGUMENT,
        )
    return cleaned


def parse_status(name: str) -> task_pb2.TaskStatus.ValueType:
    cleaned = _known_name(name, STATUSES, "status")
    return task_pb2.TaskStatus.Value("TASK_STATUS_" + cleaned.upper())


FINAL_STATUSES = frozenset(
    {
        task_pb2.TASK_STATUS_SUCCEEDED,
        task_pb2.TASK_STATUS_CANCELLED,
        task_pb2.TASK_STATUS_DEAD_LETTER,
    }
)

STRATEGIES = ["round_robin", "least_connections", "p2c_ewma", "consistent_hash"]


def strategy_name(value: int) -> str:
    return _short(admin_pb2.Strategy.Name(value), "STRATEGY_")  # type: ignore[arg-type]


def parse_strategy(name: str) -> admin_pb2.Strategy.ValueType:
    cleaned = _known_name(name, STRATEGIES, "strategy")
    return admin_pb2.Strategy.Value("STRATEGY_" + cleaned.upper())


def backend_state_name(value: int) -> str:
    return _short(admin_pb2.BackendState.Name(value), "BACKEND_STATE_")  # type: ignore[arg-type]


def cache_tier_name(value: int) -> str:
    return _short(cache_pb2.CacheTier.Name(value), "CACHE_TIER_")  # type: ignore[arg-type]
