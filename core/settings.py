"""Reading settings from ``HASHMESH_*`` environment variables, and the settings every process
shares (the database). Each process has one frozen settings dataclass of its own, built by one
``from_env()`` and overridden by its command-line flags."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

ENV_PREFIX = "HASHMESH_"
N = TypeVar("N", int, float)


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names the variable."""


def env_str(name: str, default: str) -> str:
    return os.environ.get(ENV_PREFIX + name, default)


def env_optional(name: str) -> str | None:
    value = os.environ.get(ENV_PREFIX + name, "").strip()
    return value or None


def _env_number(
    name: str, default: N, parse: Callable[[str], N], kind: str, minimum: N | None
) -> N:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = parse(raw)
    except ValueError as exc:
        raise SettingsError(f"{ENV_PREFIX}{name} must be {kind}, got {raw!r}") from exc
    if minimum is not None and value < minimum:
        raise SettingsError(f"{ENV_PREFIX}{name} must be >= {minimum}, got {value}")
    return value


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    return _env_number(name, default, int, "an integer", minimum)


def env_float(name: str, default: float, *, minimum: float | None = None) -> float:
    return _env_number(name, default, float, "a number", minimum)


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise SettingsError(f"{ENV_PREFIX}{name} must be a boolean (true/false), got {raw!r}")


def env_list(name: str, default: tuple[str, ...] = ()) -> tuple[str, ...]:
    raw = os.environ.get(ENV_PREFIX + name)
    if raw is None:
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class DatabaseSettings:
    """How a process reaches PostgreSQL. Connections opened by one process are bounded by
    ``pool_max`` plus one LISTEN connection where the process listens."""

    dsn: str | None = None
    """PostgreSQL connection string (``HASHMESH_DATABASE_URL``). ``None`` lets ``hashctl up``
    start an embedded server; daemons refuse to start without it."""
    pool_min: int = 1
    """Connections the pool keeps open (``HASHMESH_DB_POOL_MIN``)."""
    pool_max: int = 8
    """Most connections the pool opens (``HASHMESH_DB_POOL_MAX``)."""
    pool_timeout: float = 5.0
    """Seconds a caller waits for a free connection before UNAVAILABLE (``HASHMESH_DB_POOL_TIMEOUT``)."""
    retry_attempts: int = 4
    """Attempts for an operation that failed to reach the database (``HASHMESH_DB_RETRY_ATTEMPTS``)."""
    retry_base: float = 0.05
    """First backoff in seconds; doubled per attempt with full jitter (``HASHMESH_DB_RETRY_BASE``)."""
    retry_cap: float = 1.0
    """Largest backoff in seconds (``HASHMESH_DB_RETRY_CAP``)."""
    statement_timeout_ms: int = 10_000
    """Server-side statement timeout for every pooled connection (``HASHMESH_DB_STATEMENT_TIMEOUT_MS``)."""

    def __post_init__(self) -> None:
        if self.pool_min < 0 or self.pool_max < 1 or self.pool_min > self.pool_max:
            raise SettingsError(
                "need 0 <= HASHMESH_DB_POOL_MIN <= HASHMESH_DB_POOL_MAX and max >= 1"
            )
        if self.pool_timeout <= 0:
            raise SettingsError("HASHMESH_DB_POOL_TIMEOUT must be positive")
        if self.retry_attempts < 1:
            raise SettingsError("HASHMESH_DB_RETRY_ATTEMPTS must be >= 1")

    @classmethod
    def from_env(cls) -> DatabaseSettings:
        return cls(
            dsn=env_optional("DATABASE_URL"),
            pool_min=env_int("DB_POOL_MIN", cls.pool_min, minimum=0),
            pool_max=env_int("DB_POOL_MAX", cls.pool_max, minimum=1),
            pool_timeout=env_float("DB_POOL_TIMEOUT", cls.pool_timeout),
            retry_attempts=env_int("DB_RETRY_ATTEMPTS", cls.retry_attempts, minimum=1),
            retry_base=env_float("DB_RETRY_BASE", cls.retry_base, minimum=0.0),
            retry_cap=env_float("DB_RETRY_CAP", cls.retry_cap, minimum=0.0),
            statement_timeout_ms=env_int(
                "DB_STATEMENT_TIMEOUT_MS", cls.statement_timeout_ms, minimum=0
            ),
        )

    def require_dsn(self) -> str:
        if not self.dsn:
            raise SettingsError(
                "HASHMESH_DATABASE_URL is not set (use `hashctl up` to run the mesh on an "
                "embedded PostgreSQL, or point it at a server)"
            )
        return self.dsn


@dataclass(frozen=True)
class ServerSettings:
    """Where and how a gRPC daemon listens."""

    listen: str = "127.0.0.1:50051"
    """host:port to bind; port 0 picks a free one (printed at start-up)."""
    grace_seconds: float = 10.0
    """On SIGTERM: seconds in-flight calls get to finish (``HASHMESH_GRACE_SECONDS``)."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest message accepted (``HASHMESH_MAX_MESSAGE_BYTES``); larger inputs must stream."""
    metrics_port: int | None = None
    """Port for Prometheus metrics on the same host; ``None`` turns the endpoint off."""
    extra: dict[str, str] = field(default_factory=dict)
