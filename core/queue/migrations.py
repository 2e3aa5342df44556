"""Versioned SQL migrations (``sql/migrations/NNNN_name.sql``), applied in order under an
advisory lock so that several processes starting at once apply each one exactly once. The one
module that runs them: hashd and workerd call ``migrate`` at start, ``hashctl up`` and
``hashctl db migrate`` too. Driver errors leave as ``Unavailable`` (unreachable) or
``DatabaseError`` (``hashmesh.core.queue.db.sync_errors``)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from hashmesh.core.queue.db import sync_errors

log = logging.getLogger(__name__)

# Any constant works; it only has to be the same in every hashmesh process.
MIGRATION_LOCK_ID = 0x4A5348_4D455348 & 0x7FFFFFFFFFFFFFFF
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def load_migrations() -> list[Migration]:
    folder = resources.files("hashmesh.core.queue") / "sql" / "migrations"
    found = []
    for entry in folder.iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(
                Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8"))
            )
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    # Numbers are reserved per branch of work, so a gap is normal; a duplicate is a mistake.
    if len(set(versions)) != len(versions) or (versions and versions[0] < 1):
        raise RuntimeError(f"migrations must have distinct numbers from 1 up, found {versions}")
    return found


def require_utf8(conn: psycopg.Connection[Any]) -> None:
    """Refuse a database not encoded in UTF8: with SQL_ASCII, for one, every text column
    hashmesh reads fails to decode and every task call would end INTERNAL."""
    row = conn.execute(
        "SELECT pg_encoding_to_char(encoding) FROM pg_database WHERE datname = current_database()"
    ).fetchone()
    found = row[0] if row else "unknown"
    # A SQL_ASCII connection hands text back as bytes: that alone says what is wrong.
    encoding = found.decode("ascii", "replace") if isinstance(found, bytes) else str(found)
    if encoding != "UTF8":
        raise psycopg.NotSupportedError(
            f"database {conn.info.dbname!r} is encoded in {encoding}; hashmesh needs UTF8 "
            "(CREATE DATABASE ... ENCODING 'UTF8' TEMPLATE template0)"
        )


def migrate(dsn: str) -> list[Migration]:
    """Apply pending migrations to ``dsn``; returns those applied by this call. Every
    hashmesh process runs it at start, so a database it cannot use is refused here."""
    applied: list[Migration] = []
    with sync_errors("applying migrations"), psycopg.connect(dsn, autocommit=True) as conn:
        require_utf8(conn)
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_ID,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS hashmesh_schema_migrations (
                       version integer PRIMARY KEY,
                       name text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {
                row[0] for row in conn.execute("SELECT version FROM hashmesh_schema_migrations")
            }
            for migration in load_migrations():
                if migration.version in done:
                    continue
                with conn.transaction():
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO hashmesh_schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
                log.info(
                    "applied migration",
                    extra={"version": migration.version, "migration": migration.name},
                )
                applied.append(migration)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_ID,))
    return applied


def current_version(dsn: str) -> int:
    """The highest migration applied to ``dsn`` (0 for an empty database)."""
    with sync_errors("reading the schema version"), psycopg.connect(dsn, autocommit=True) as conn:
        exists = conn.execute(
            "SELECT to_regclass('hashmesh_schema_migrations') IS NOT NULL"
        ).fetchone()
        if not exists or not exists[0]:
            return 0
        row = conn.execute(
            "SELECT coalesce(max(version), 0) FROM hashmesh_schema_migrations"
        ).fetchone()
        return int(row[0]) if row else 0
