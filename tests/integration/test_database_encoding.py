"""A database not encoded in UTF8 (SQL_ASCII) is refused at start by every hashmesh process,
with one line naming the encoding, instead of INTERNAL on every task call later."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator

import psycopg
import pytest


@pytest.fixture
def sql_ascii_dsn(pg_admin_dsn: str) -> Iterator[str]:
    name = f"hm_ascii_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(
            f"CREATE DATABASE \"{name}\" ENCODING 'SQL_ASCII' TEMPLATE template0 "
            "LC_COLLATE 'C' LC_CTYPE 'C'"
        )
    yield pg_admin_dsn.rsplit("/", 1)[0] + f"/{name}"
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    "argv",
    [
        ["hashmesh.hashd", "--listen", "127.0.0.1:0", "--database-url"],
        ["hashmesh.workerd", "--database-url"],
        ["hashmesh.cli", "db", "migrate", "--dsn"],
    ],
    ids=["hashd", "workerd", "hashctl-db-migrate"],
)
def test_a_sql_ascii_database_is_refused_at_start_in_one_line(
    sql_ascii_dsn: str, argv: list[str]
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", *argv, sql_ascii_dsn], capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
    assert "is encoded in SQL_ASCII; hashmesh needs UTF8" in lines[0]
    with psycopg.connect(sql_ascii_dsn) as conn:  # and nothing was created in it
        assert conn.execute("SELECT to_regclass('hashmesh_schema_migrations')").fetchone() == (
            None,
        )
