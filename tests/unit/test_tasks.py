"""Pure parts of the task queue: SQL sections, validation, page tokens, limits, payloads."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import cast

import pytest

from hashmesh.core.errors import InvalidArgument, ResourceExhausted
from hashmesh.core.queue.limits import PendingLimits
from hashmesh.core.queue.model import ListCursor, ListFilter, TaskStatus
from hashmesh.core.queue.store import parse_sections, queries
from hashmesh.hashd.task_service import decode_page_token, encode_page_token, validate_spec
from hashmesh.hashd.watch import parse_status_payload
from hashmesh.v1 import common_pb2, task_pb2
from hashmesh.workerd import handlers
from hashmesh.workerd.config import WorkerSettings


def test_sql_sections_are_loaded_with_columns_filled_in() -> None:
    loaded = queries()
    for name in (
        "submit",
        "claim",
        "complete",
        "fail",
        "heartbeat",
        "reclaim_lost",
        "list",
        "cancel",
    ):
        assert name in loaded and "{columns}" not in loaded[name]
    assert "FOR UPDATE SKIP LOCKED" in loaded["claim"]
    parsed = parse_sections("-- name: a\nSELECT 1\n-- name: b\n-- comment\nSELECT {columns}\n")
    assert parsed["a"] == "SELECT 1"
    assert parsed["b"].startswith("-- comment") and "cancel_requested" in parsed["b"]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (task_pb2.TaskSpec(), "specs[2].algorithm"),
        (task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, priority=101), "specs[2].priority"),
        (
            task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, max_attempts=101),
            "specs[2].max_attempts",
        ),
        (
            task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, idempotency_key="k" * 201),
            "specs[2].idempotency_key",
        ),
        (
            task_pb2.TaskSpec(
                algorithm=common_pb2.ALGORITHM_ARGON2ID,
                argon2=common_pb2.Argon2Params(time_cost=99),
            ),
            "specs[2].argon2.time_cost",
        ),
    ],
)
def test_validation_names_the_field(spec: task_pb2.TaskSpec, field: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(spec, field="specs[2]", default_max_attempts=5)
    assert caught.value.field == field


def test_valid_spec_takes_defaults() -> None:
    spec = task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x", priority=-100)
    due = datetime.now(UTC).replace(microsecond=0) + timedelta(days=30)
    spec.run_after.FromDatetime(due)
    task, params = validate_spec(spec, field="spec", default_max_attempts=7)
    assert (task.algorithm, task.max_attempts, task.priority, params) == ("sha256", 7, -100, None)
    assert task.run_after == due


def test_run_after_more_than_a_year_ahead_is_refused() -> None:
    spec = task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x")
    spec.run_after.FromDatetime(datetime.now(UTC) + timedelta(days=400))
    with pytest.raises(InvalidArgument) as caught:
        validate_spec(spec, field="spec", default_max_attempts=7)
    assert caught.value.field == "spec.run_after"


def test_page_token_round_trip_and_filter_binding() -> None:
    filters = ListFilter(client_id="c", statuses=(TaskStatus.PENDING,), algorithm="md5")
    cursor = ListCursor(
        datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC), "0b7e3a0c-4a4d-4c5e-9d3e-2f1f1f1f1f1f"
    )
    token = encode_page_token(cursor, filters)
    assert decode_page_token(token, filters) == cursor
    assert decode_page_token("", filters) is None
    with pytest.raises(InvalidArgument, match="other filters"):
        decode_page_token(token, ListFilter(client_id="other"))
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token("not-a-token!", filters)
    assert caught.value.field == "page_token"


def test_status_payload_parsing_skips_garbage() -> None:
    payload = "a1 running,b2 succeeded,bad,c3 nonsense"
    assert parse_status_payload(payload) == [
        ("a1", TaskStatus.RUNNING, None),
        ("b2", TaskStatus.SUCCEEDED, None),
    ]
    assert parse_status_payload("[not json") == []
    assert parse_status_payload('[{"id": "x"}, 3, {"id": "y", "status": "running"}]') == [
        ("y", TaskStatus.RUNNING, None)
    ]


def test_status_payload_carries_whole_tasks() -> None:
    entry = {
        "id": "0b7e3a0c-4a4d-4c5e-9d3e-2f1f1f1f1f1f", "algorithm": "md5", "status": "succeeded",
        "priority": 0, "attempts": 1, "max_attempts": 5, "client_id": "c",
        "idempotency_key": None, "input_size": 3, "result_digest": "00ff",
        "result_encoded": "00ff", "cached": False, "last_error": None,
        "created_at": "2026-12-01T09:47:12.123456+00:00",
        "run_after": "2026-12-01T09:47:12.123456+00:00",
        "started_at": "2026-12-01T09:47:12.2+00:00", "finished_at": "2026-12-01T09:47:13+00:00",
        "worker": "w", "cancel_requested": False,
    }  # fmt: skip
    [(task_id, status, record)] = parse_status_payload(json.dumps([entry]))
    assert record is not None and status is TaskStatus.SUCCEEDED
    assert record.result_digest == b"\x00\xff" and record.finished_at is not None
    assert record.finished_at.tzinfo is not None and record.id == task_id


def test_limits_refuse_whole_batches_globally_and_per_client() -> None:
    counted = {"a": 3, "b": 1}

    async def count() -> dict[str, int]:
        return dict(counted)

    async def scenario() -> None:
        limits = PendingLimits(max_total=10, max_per_client=5, count=count, refresh_seconds=3600)
        await limits.admit("a", 2)
        limits.accepted("a", 2)
        with pytest.raises(ResourceExhausted) as per_client:
            await limits.admit("a", 1)
        assert per_client.value.reason == "CLIENT_QUEUE_FULL" and per_client.value.retry_after > 0
        await limits.admit("b", 4)
        limits.accepted("b", 4)
        with pytest.raises(ResourceExhausted) as total:
            await limits.admit("c", 1)
        assert total.value.reason == "QUEUE_FULL"

    asyncio.run(scenario())


def test_limits_hold_calls_in_progress_and_count_once_for_the_first_callers() -> None:
    counts: list[int] = []

    async def count() -> dict[str, int]:
        counts.append(1)
        await asyncio.sleep(0)
        return {"a": 1}

    async def scenario() -> None:
        limits = PendingLimits(max_total=100, max_per_client=4, count=count, refresh_seconds=3600)
        held: list[object] = []
        release = asyncio.Event()

        async def call(stored: bool) -> None:
            async with limits.reserve("a", 1) as reservation:
                held.append(reservation)
                await release.wait()
                if stored:
                    reservation.stored(1)

        # Three calls fit beside the one counted task; every later one is refused while
        # they are in progress, before any of them stored anything.
        calls = [asyncio.ensure_future(call(stored=i != 0)) for i in range(10)]
        results = await asyncio.wait_for(_settled(calls, held, 3), timeout=30)
        assert sum(isinstance(r, ResourceExhausted) for r in results) == 7
        assert len(counts) == 1  # one count for all the first callers
        release.set()
        await asyncio.gather(*calls, return_exceptions=True)
        # Two were stored (the third stored nothing): they count as accepted now.
        await limits.admit("a", 1)
        with pytest.raises(ResourceExhausted):
            await limits.admit("a", 2)

    asyncio.run(scenario())


async def _settled(
    calls: list[asyncio.Future[None]], held: list[object], holding: int
) -> list[BaseException | None]:
    """The calls' outcomes once all but ``holding`` of them have ended (refused)."""
    while sum(c.done() for c in calls) < len(calls) - holding or len(held) < holding:
        await asyncio.sleep(0)
    return [c.exception() if c.done() else None for c in calls]


def test_coalescer_shares_statements_and_keeps_each_callers_tasks_together() -> None:
    from contextlib import asynccontextmanager

    from hashmesh.core.errors import Unavailable
    from hashmesh.core.queue.coalesce import SubmitCoalescer, SubmitMany
    from hashmesh.core.queue.model import NewTask, Submitted, TaskRecord

    statements: list[int] = []
    sessions: list[int] = []

    async def submit_many(tasks: Sequence[NewTask]) -> list[Submitted]:
        statements.append(len(tasks))
        await asyncio.sleep(0)
        if any(t.data == b"down" for t in tasks):
            raise Unavailable("database gone", retry_after=1.0, reason="DATABASE_UNAVAILABLE")
        if any(t.data == b"boom" for t in tasks):
            raise RuntimeError("statement failed")
        return [Submitted(cast(TaskRecord, t.data), created=True) for t in tasks]

    @asynccontextmanager
    async def session() -> AsyncIterator[SubmitMany]:
        sessions.append(1)
        yield submit_many

    async def scenario() -> None:
        coalescer = SubmitCoalescer(session, max_tasks=5, max_in_flight=1)
        calls = [[NewTask("md5", b"%d-%d" % (c, i)) for i in range(c % 3 + 1)] for c in range(6)]
        answers = await asyncio.gather(*(coalescer.submit(call) for call in calls))
        for call, answer in zip(calls, answers, strict=True):
            assert [a.task for a in answer] == [t.data for t in call]
        assert len(statements) < len(calls) and max(statements) <= 5
        assert len(sessions) < len(statements)  # a drain keeps its session between statements
        # One caller's refused rows inside a shared statement: that caller alone fails.
        statements.clear()
        first = asyncio.ensure_future(coalescer.submit([NewTask("md5", b"first")]))
        await asyncio.sleep(0)  # one loop turn: the drain starts with ``first`` alone
        rest = [[NewTask("md5", b"a")], [NewTask("md5", b"boom")], [NewTask("md5", b"b")]]
        results = await asyncio.gather(
            first, *(coalescer.submit(c) for c in rest), return_exceptions=True
        )
        assert statements == [1, 3, 1, 1, 1]  # shared, then each caller of it alone
        assert [r[0].task for r in results if not isinstance(r, BaseException)] == [
            b"first",
            b"a",
            b"b",
        ]
        assert isinstance(results[2], RuntimeError)
        # Unavailable is every caller's answer in that statement: nothing of it was stored.
        first = asyncio.ensure_future(coalescer.submit([NewTask("md5", b"first")]))
        await asyncio.sleep(0)
        down = [[NewTask("md5", b"c")], [NewTask("md5", b"down")]]
        results = await asyncio.gather(
            first, *(coalescer.submit(c) for c in down), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in results[1:])
        assert coalescer.waiting == 0

    asyncio.run(scenario())


def test_handlers_compute_digests_and_inject_failures() -> None:
    digest, encoded = handlers.compute("sha256", b"abc", {})
    assert digest == hashlib.sha256(b"abc").digest() and encoded == digest.hex()
    with pytest.raises(handlers.InjectedFailure):
        handlers.compute("md5", b"secret-input", {}, fail={"md5"})
    try:
        handlers.compute("md5", b"secret-input", {}, fail={"md5"})
    except handlers.InjectedFailure as exc:
        assert "secret-input" not in handlers.describe_error(exc)


def test_worker_settings_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HASHMESH_WORKERD_CONCURRENCY", "7")
    monkeypatch.setenv("HASHMESH_WORKERD_FAIL_ALGORITHMS", "md5, sha1")
    settings = WorkerSettings.from_env()
    assert settings.concurrency == 7 and settings.fail_algorithms == ("md5", "sha1")
    with pytest.raises(ValueError):
        WorkerSettings(lease_seconds=1.0, heartbeat_seconds=2.0)


def test_task_ids_are_uuidv7_ordered_by_time() -> None:
    import uuid

    from hashmesh.core.queue.model import new_task_id

    earlier = [new_task_id(now_ns=1_800_000_000_000_000_000 + i) for i in range(50)]
    later = new_task_id(now_ns=1_800_000_000_001_000_000)  # one millisecond on
    assert all(uuid.UUID(i).version == 7 and uuid.UUID(i).variant == uuid.RFC_4122 for i in earlier)
    assert len(set(earlier)) == 50  # same millisecond: the random bits differ
    assert max(earlier) < later  # the primary key grows at its right edge
    assert uuid.UUID(later).int >> 80 == 1_800_000_000_001
