"""The PostgreSQL task store: the only module that speaks SQL about tasks."""

from __future__ import annotations

from typing import Any

import psycopg_pool
from psycopg.types.json import Jsonb

from hashmesh.core.db import connection
from hashmesh.core.errors import NotFound
from hashmesh.core.tasks.model import ClaimedTask, NewTask, TaskRecord

_COLUMNS = """id, algorithm, status, priority, attempts, max_attempts, client_id, idempotency_key,
    input_size, result_digest, result_encoded, cached, last_error, created_at, run_after,
    started_at, finished_at, worker, cancel_requested"""


class PostgresTaskStore:
    def __init__(self, pool: psycopg_pool.AsyncConnectionPool) -> None:
        self._pool = pool

    async def submit(self, task: NewTask) -> TaskRecord:
        async with connection(self._pool, what="submitting a task") as conn:
            cur = await conn.execute(
                f"""INSERT INTO hashmesh_tasks (algorithm, input, input_size, params, priority,
                        max_attempts, run_after, client_id, idempotency_key)
                    VALUES (%s, %s, %s, %s, %s, %s, coalesce(%s, now()), %s, %s)
                    RETURNING {_COLUMNS}""",
                (
                    task.algorithm,
                    task.data,
                    len(task.data),
                    Jsonb(task.params),
                    task.priority,
                    task.max_attempts,
                    task.run_after,
                    task.client_id,
                    task.idempotency_key,
                ),
            )
            row = await cur.fetchone()
        assert row is not None
        return TaskRecord.from_row(row)

    async def get(self, task_id: str) -> TaskRecord:
        async with connection(self._pool, what="reading a task") as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM hashmesh_tasks WHERE id = %s", (task_id,)
            )
            row = await cur.fetchone()
        if row is None:
            raise NotFound(f"task {task_id} not found")
        return TaskRecord.from_row(row)

    async def claim(self, worker: str, limit: int, lease_seconds: float) -> list[ClaimedTask]:
        async with connection(self._pool, what="claiming tasks") as conn:
            cur = await conn.execute(
                """WITH picked AS (
                       SELECT id FROM hashmesh_tasks
                       WHERE status IN ('pending', 'retrying') AND run_after <= now()
                       ORDER BY priority DESC, run_after, id
                       LIMIT %s FOR UPDATE SKIP LOCKED)
                   UPDATE hashmesh_tasks t
                   SET status = 'running', attempts = t.attempts + 1, worker = %s,
                       lease_id = nextval('hashmesh_lease_seq'),
                       lease_expires_at = now() + make_interval(secs => %s),
                       started_at = now(), updated_at = now()
                   FROM picked WHERE t.id = picked.id
                   RETURNING t.id, t.algorithm, t.input, t.params, t.attempts, t.max_attempts, t.lease_id""",
                (limit, worker, lease_seconds),
            )
            rows = await cur.fetchall()
        return [_claimed(row) for row in rows]

    async def complete(self, task_id: str, lease_id: int, digest: bytes, encoded: str) -> bool:
        """Record a result; only the current lease holder succeeds (fencing)."""
        async with connection(self._pool, what="completing a task") as conn:
            cur = await conn.execute(
                """UPDATE hashmesh_tasks
                   SET status = 'succeeded', result_digest = %s, result_encoded = %s,
                       finished_at = now(), updated_at = now(), lease_id = NULL, lease_expires_at = NULL,
                       input = CASE WHEN algorithm = 'argon2id' THEN NULL ELSE input END
                   WHERE id = %s AND lease_id = %s AND status = 'running'""",
                (digest, encoded, task_id, lease_id),
            )
            return cur.rowcount == 1


def _claimed(row: dict[str, Any]) -> ClaimedTask:
    return ClaimedTask(
        id=str(row["id"]),
        algorithm=row["algorithm"],
        data=bytes(row["input"] or b""),
        params=dict(row["params"] or {}),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        lease_id=row["lease_id"],
    )
