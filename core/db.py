"""PostgreSQL access shared by hashd and workerd: a bounded psycopg_pool, retries with
exponential backoff and full jitter, and the one place driver errors become hashmesh errors.

This and the store modules are the only importers of psycopg."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from hashmesh.core import metrics
from hashmesh.core.errors import Unavailable
from hashmesh.core.settings import DatabaseSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errors that mean "the database could not be reached or dropped us"; worth a retry.
TRANSIENT = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.errors.AdminShutdown)


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(cap, base * 2**attempt)]."""
    return random.uniform(0.0, min(cap, base * (2**attempt)))


def make_pool(
    settings: DatabaseSettings, *, name: str, max_size: int | None = None
) -> psycopg_pool.AsyncConnectionPool:
    """A pool that is not opened yet (constructors do no I/O): ``await pool.open()``."""

    return psycopg_pool.AsyncConnectionPool(
        settings.require_dsn(),
        min_size=min(settings.pool_min, max_size or settings.pool_max),
        max_size=max_size or settings.pool_max,
        timeout=settings.pool_timeout,
        open=False,
        name=name,
        kwargs={
            "row_factory": dict_row,
            "autocommit": True,
            "application_name": name,
            "options": f"-c statement_timeout={int(settings.statement_timeout_ms)}",
        },
        reconnect_timeout=3600.0,
        check=psycopg_pool.AsyncConnectionPool.check_connection,
    )


async def with_retries(
    settings: DatabaseSettings, operation: Callable[[], Awaitable[T]], *, what: str
) -> T:
    """Run ``operation``; on a transient database error retry with backoff, then raise
    ``Unavailable`` naming what failed. Only for operations that are safe to repeat."""
    for attempt in range(settings.retry_attempts):
        try:
            return await operation()
        except TRANSIENT as exc:
            if attempt + 1 >= settings.retry_attempts:
                raise Unavailable(
                    f"database unavailable while {what}: {type(exc).__name__}", retry_after=1.0,
                    reason="DATABASE_UNAVAILABLE",
                ) from exc
            delay = backoff_delay(attempt, settings.retry_base, settings.retry_cap)
            log.warning(
                "database error, retrying",
                extra={"what": what, "attempt": attempt + 1, "delay_s": round(delay, 3)},
            )
            metrics.DB_RETRIES.inc()
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


@asynccontextmanager
async def connection(
    pool: psycopg_pool.AsyncConnectionPool, *, what: str
) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
    """A pooled connection; driver errors surface as ``Unavailable`` naming ``what``."""
    try:
        async with pool.connection() as conn:
            yield conn
    except psycopg_pool.PoolTimeout as exc:
        raise Unavailable(
            f"no database connection free while {what} (pool exhausted)",
            retry_after=0.5,
            reason="DATABASE_UNAVAILABLE",
        ) from exc
    except psycopg.OperationalError as exc:
        raise Unavailable(
            f"database unavailable while {what}: {type(exc).__name__}",
            retry_after=1.0,
            reason="DATABASE_UNAVAILABLE",
        ) from exc


def redact_dsn(dsn: str) -> str:
    """``dsn`` fit to show or log: its password replaced by ``***`` (URL or key=value form)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(a connection string that does not parse)"
    if "password" in parts:
        parts["password"] = "***"
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in parts.items()})
