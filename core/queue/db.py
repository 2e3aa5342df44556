"""PostgreSQL access shared by hashd and workerd: a bounded psycopg_pool, retries with
exponential backoff and full jitter, and where driver errors become hashmesh errors
(``connection`` for pooled work, ``sync_errors`` for the short connections of migrations and
operator commands). Only modules of ``hashmesh.core.queue`` import psycopg; the rest of the
mesh sees ``Unavailable`` and ``DatabaseError``."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

import psycopg
import psycopg_pool
from psycopg.rows import dict_row

from hashmesh.core import metrics
from hashmesh.core.backoff import backoff_delay
from hashmesh.core.errors import Unavailable
from hashmesh.core.settings import DatabaseSettings

log = logging.getLogger(__name__)

T = TypeVar("T")

Pool = psycopg_pool.AsyncConnectionPool
"""The connection pool type, for modules that hold one without importing the driver."""

# Errors that mean "the database could not be reached or dropped us"; worth a retry.
TRANSIENT = (psycopg.OperationalError, psycopg_pool.PoolTimeout, psycopg.errors.AdminShutdown)


class DatabaseError(Exception):
    """The database refused what retrying will not fix (a connection string that does not
    parse, a migration that fails). Raised at start-up and by operator commands, never sent
    to a client; the message names what was being done and the driver's first line."""


def first_line(exc: BaseException) -> str:
    """The first line of a driver message (the rest is context such as hints), or the type."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def unavailable(what: str, exc: BaseException) -> Unavailable:
    """The answer for a driver error while doing ``what``: the database went away (retry in a
    second). Raise it ``from exc``."""
    return Unavailable(
        f"database unavailable while {what}: {type(exc).__name__}",
        retry_after=1.0,
        reason="DATABASE_UNAVAILABLE",
    )


@contextmanager
def sync_errors(what: str) -> Iterator[None]:
    """Around a short synchronous connection: an unreachable database as ``Unavailable``,
    anything else the driver raises as ``DatabaseError``, both naming ``what``."""
    try:
        yield
    except psycopg.OperationalError as exc:
        raise Unavailable(
            f"{what}: the database cannot be reached ({first_line(exc)})",
            retry_after=1.0,
            reason="DATABASE_UNAVAILABLE",
        ) from exc
    except psycopg.Error as exc:
        raise DatabaseError(f"{what}: {first_line(exc)}") from exc


def make_pool(
    settings: DatabaseSettings,
    *,
    name: str,
    max_size: int | None = None,
    index_only_plans: bool = False,
) -> psycopg_pool.AsyncConnectionPool:
    """A pool that is not opened yet (constructors do no I/O): ``await pool.open()``.

    ``index_only_plans`` (workerd) sets ``enable_seqscan = off`` on its connections: every
    worker statement is meant to reach its rows through an index, but on a table the planner
    has no statistics for yet (a new database) or whose statistics are older than its churn,
    it prefers a scan of the whole table and keeps that plan cached for the connection's life
    (measured in bench/tasks_e2e.py: 30-90 table scans a second, ~1,000 rows read per claimed
    task). A statement with no index to use still runs, as a scan."""

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
            "options": f"-c statement_timeout={int(settings.statement_timeout_ms)}"
            + (" -c enable_seqscan=off" if index_only_plans else ""),
        },
        reconnect_timeout=3600.0,
        check=_check_if_idle,
        reset=_note_return,
    )


RECENTLY_USED_SECONDS = 1.0
"""A connection returned to the pool this recently is handed out without a check query: under
load every statement would otherwise pay one more round trip. One that broke meanwhile fails
its statement as ``Unavailable`` (callers retry), and the pool replaces it."""
_returned_at: weakref.WeakKeyDictionary[psycopg.AsyncConnection[Any], float] = (
    weakref.WeakKeyDictionary()
)


async def _note_return(conn: psycopg.AsyncConnection[Any]) -> None:
    _returned_at[conn] = time.monotonic()


async def _check_if_idle(conn: psycopg.AsyncConnection[Any]) -> None:
    returned = _returned_at.get(conn)
    if returned is not None and time.monotonic() - returned < RECENTLY_USED_SECONDS:
        return
    await psycopg_pool.AsyncConnectionPool.check_connection(conn)


async def with_retries(
    settings: DatabaseSettings, operation: Callable[[], Awaitable[T]], *, what: str
) -> T:
    """Run ``operation``; on a transient database error (or ``Unavailable``) retry with
    backoff (``HASHMESH_DB_RETRY_*``), then raise ``Unavailable`` naming what failed. Only for
    operations that are safe to repeat."""
    for attempt in range(settings.retry_attempts):
        try:
            return await operation()
        except (*TRANSIENT, Unavailable) as exc:
            if attempt + 1 >= settings.retry_attempts:
                if isinstance(exc, Unavailable):
                    raise
                raise unavailable(what, exc) from exc
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
        raise unavailable(what, exc) from exc


def redact_dsn(dsn: str) -> str:
    """``dsn`` fit to show or log: its password replaced by ``***`` (URL or key=value form)."""
    try:
        parts = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "(a connection string that does not parse)"
    if "password" in parts:
        parts["password"] = "***"
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in parts.items()})
