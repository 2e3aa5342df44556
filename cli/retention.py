"""``hashctl task prune``: one retention run (or its preview) against PostgreSQL directly."""

from __future__ import annotations

import asyncio
from typing import Any

from hashmesh.cli.client import CliError, ExitCode
from hashmesh.core.errors import Unavailable
from hashmesh.core.queue import db
from hashmesh.core.queue.model import TaskStatus
from hashmesh.core.queue.retention import RetentionPolicy
from hashmesh.core.queue.store import PostgresTaskStore
from hashmesh.core.settings import DatabaseSettings, SettingsError

FINAL = (TaskStatus.SUCCEEDED, TaskStatus.CANCELLED, TaskStatus.DEAD_LETTER)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "forever"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def run_prune(dsn: str, *, dry_run: bool) -> dict[str, Any]:
    """{statuses: [{status, kept_for, count}], total, skipped} for the policy from the env."""
    try:
        policy = RetentionPolicy.from_env()
    except SettingsError as exc:
        raise CliError(str(exc), ExitCode.USAGE) from None

    async def main() -> dict[str, Any]:
        pool = db.make_pool(DatabaseSettings(dsn=dsn, pool_max=1), name="hashctl-prune")
        await pool.open()
        try:
            store = PostgresTaskStore(pool)
            if dry_run:
                counts = await store.prune_preview(policy.ages)
                skipped = False
            else:
                run = await store.prune(policy.ages, batch=policy.batch_size)
                counts = run.deleted if run else {}
                skipped = run is None
        finally:
            await pool.close()
        rows = [
            {"status": s.value, "kept_for": _age(policy.ages.get(s)), "count": counts.get(s, 0)}
            for s in FINAL
        ]
        return {"statuses": rows, "total": sum(counts.values()), "skipped": skipped,
                "dry_run": dry_run}  # fmt: skip

    try:
        return asyncio.run(main())
    except Unavailable as exc:
        raise CliError(f"cannot reach the database: {exc.message}", ExitCode.UNAVAILABLE) from None
