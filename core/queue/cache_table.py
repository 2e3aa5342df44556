"""The result cache's shared tier on PostgreSQL: the table ``hashmesh_cache`` (its SQL in
``sql/cache.sql``) and the channel that tells every process to empty its memory tier. The
cache's logic (keys, tiers, timeouts, the breaker) is ``hashmesh.core.hashing.cache``; this
module only talks to the database, and every driver error leaves it as ``Unavailable``."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from functools import cache
from importlib import resources
from typing import Any

import psycopg
import psycopg_pool

from hashmesh.core.errors import Unavailable
from hashmesh.core.queue.db import Pool, connection
from hashmesh.core.queue.store import Listener, parse_sections

CLEAR_CHANNEL = "hashmesh_cache_clear"
"""NOTIFY channel of ``clear()``; the payload is the clearing process's instance id."""
SECRET_KEY = b"hashmesh:cache-secret:v1"
"""Key of the per-database secret's row: no 32-byte HMAC key can be equal to it."""


@cache
def _queries() -> dict[str, str]:
    text = (resources.files("hashmesh.core.queue") / "sql" / "cache.sql").read_text("utf-8")
    return parse_sections(text)


def _q(name: str) -> str:
    return _queries()[name]


class PostgresCacheTable:
    """``hashmesh_cache`` through the daemon's pool (no pool of its own), plus one LISTEN
    connection of its own for clears (``clear_listener``). Constructing it does no I/O."""

    def __init__(self, pool: Pool, *, dsn: str | None = None) -> None:
        self._pool = pool
        conninfo = pool.conninfo  # a callable when the pool computes it per connection
        self._dsn = dsn or (conninfo if isinstance(conninfo, str) else None)
        """For the LISTEN connection; the pool's by default."""

    @contextlib.asynccontextmanager
    async def _connection(
        self, timeout: float | None, what: str
    ) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        try:
            async with self._pool.connection(timeout=timeout) as conn:
                yield conn
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            raise Unavailable(
                f"result cache table unavailable while {what}: {type(exc).__name__}",
                retry_after=1.0,
                reason="DATABASE_UNAVAILABLE",
            ) from exc

    async def lookup(self, key: bytes, *, timeout: float) -> tuple[bytes, float] | None:
        """The value stored under ``key`` and its remaining life in seconds, if unexpired."""
        async with self._connection(timeout, "looking up") as conn:
            cur = await conn.execute(_q("lookup"), {"key": key}, prepare=True)
            row: dict[str, Any] | None = await cur.fetchone()
        return None if row is None else (bytes(row["value"]), float(row["ttl"]))

    async def put(self, key: bytes, value: bytes, *, ttl_seconds: float, timeout: float) -> None:
        params = {"key": key, "value": value, "ttl_seconds": ttl_seconds}
        async with self._connection(timeout, "storing") as conn:
            await conn.execute(_q("store"), params, prepare=True)

    async def count(self, *, timeout: float) -> int:
        """Unexpired entries (the secret's row not counted)."""
        async with self._connection(timeout, "counting") as conn:
            cur = await conn.execute(_q("count"), {"secret_key": SECRET_KEY})
            row: dict[str, Any] | None = await cur.fetchone()
        return int(row["n"]) if row else 0

    async def sweep(self, batch: int) -> int:
        """Remove up to ``batch`` expired entries; how many went."""
        async with self._connection(None, "sweeping") as conn:
            cur = await conn.execute(_q("sweep"), {"batch": batch})
            return max(0, cur.rowcount)

    async def clear(self, sender: str) -> int:
        """Remove every entry (not the secret) and tell every process's ``clear_listener``,
        with ``sender`` as the payload; how many entries went."""
        async with connection(self._pool, what="clearing the cache") as conn:
            cur = await conn.execute(_q("clear"), {"secret_key": SECRET_KEY})
            removed = max(0, cur.rowcount)
            await conn.execute(_q("announce_clear"), {"channel": CLEAR_CHANNEL, "sender": sender})
        return removed

    async def secret(self, candidate: bytes) -> bytes:
        """The per-database secret: ``candidate`` when this call is the first, else the one
        stored before."""
        async with self._connection(None, "loading the secret") as conn:
            await conn.execute(_q("secret_create"), {"secret_key": SECRET_KEY, "value": candidate})
            cur = await conn.execute(_q("secret_read"), {"secret_key": SECRET_KEY})
            row: dict[str, Any] | None = await cur.fetchone()
        if row is None:  # only when someone deleted it between the two statements
            raise Unavailable("the cache secret vanished", reason="DATABASE_UNAVAILABLE")
        return bytes(row["value"])

    def clear_listener(self) -> Listener | None:
        """A LISTEN connection (not opened yet) on ``CLEAR_CHANNEL``; ``None`` without a DSN."""
        if not self._dsn:
            return None
        return Listener(self._dsn, [CLEAR_CHANNEL], name="hashmesh-cache-listen")
