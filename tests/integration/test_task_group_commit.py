"""Group commit of single submissions (core/queue/coalesce.py) in a real hashd against a real
PostgreSQL: concurrent SubmitTask calls share INSERT statements and commits, and each caller
still gets its own answer.

Coalescing is made certain, not hoped for: a statement-level trigger installed by the test makes
every INSERT into the task table wait for an advisory lock the test holds, so the two statements
hashd keeps in flight block, and the calls sent after them queue up in hashd (its gauge
``hashmesh_task_submit_waiting_calls`` says how many) until the test lets go."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import psycopg
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.scrape import scrape, value

GATE = 4711
GATE_SQL = f"""
CREATE FUNCTION test_submit_gate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared({GATE});
    RETURN NULL;
END $$;
CREATE TRIGGER test_submit_gate BEFORE INSERT ON hashmesh_tasks
    FOR EACH STATEMENT EXECUTE FUNCTION test_submit_gate();
-- A row the database refuses although hashd found nothing wrong with it.
CREATE FUNCTION test_refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idempotency_key = 'poison' THEN
        RAISE EXCEPTION 'poisoned row';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER test_refuse_poison BEFORE INSERT ON hashmesh_tasks
    FOR EACH ROW EXECUTE FUNCTION test_refuse_poison();
"""
BLOCKED = f"""SELECT pid FROM pg_locks
WHERE locktype = 'advisory' AND classid = 0 AND objid = {GATE} AND NOT granted"""
TIMEOUT = 60.0


class Gate:
    """The test's hold on every submit statement, and views of what waits behind it."""

    def __init__(self, dsn: str, metrics_address: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.metrics_address = metrics_address
        self.conn.execute(GATE_SQL)

    def close(self) -> None:
        self.conn.close()

    def hold(self) -> None:
        self.conn.execute("SELECT pg_advisory_lock(%s)", (GATE,))

    def release(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", (GATE,))

    def blocked(self) -> list[int]:
        """Backends whose submit statement waits at the gate."""
        return [pid for (pid,) in self.conn.execute(BLOCKED).fetchall()]

    def waiting_in_hashd(self) -> float:
        return value(scrape(self.metrics_address), "hashmesh_task_submit_waiting_calls") or 0.0

    def until(self, check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + TIMEOUT
        while not check():
            assert time.monotonic() < deadline, f"never: {what}"
            time.sleep(0.02)

    def statements(self) -> float:
        """Shared submit statements hashd has sent (successes and failures alike)."""
        samples = scrape(self.metrics_address)
        return value(samples, "hashmesh_task_submit_statements_total") or 0.0


Gated = tuple[task_pb2_grpc.TaskServiceStub, Gate]


@pytest.fixture
def gated(dsn: str, procs: Processes) -> Iterator[Callable[[int], Gated]]:
    """``gated(cap)``: a hashd (per-client cap ``cap``) whose submit statements wait at the gate."""
    opened: list[tuple[grpc.Channel, Gate]] = []

    def start(cap: int) -> Gated:
        hashd = procs.hashd(
            dsn,
            "--metrics-port",
            "0",
            # No statement timeout: the gate holds statements as long as a loaded machine needs.
            env={
                "HASHMESH_MAX_PENDING_PER_CLIENT": str(cap),
                "HASHMESH_DB_POOL_MAX": "6",
                "HASHMESH_DB_STATEMENT_TIMEOUT_MS": "0",
            },
        )
        gate = Gate(dsn, hashd.addresses["hashd metrics"])
        channel = grpc.insecure_channel(hashd.address)
        opened.append((channel, gate))
        return task_pb2_grpc.TaskServiceStub(channel), gate

    yield start
    for channel, gate in opened:
        channel.close()
        gate.close()


def spec(data: bytes, **fields: Any) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=data, **fields)


def send(stub: task_pb2_grpc.TaskServiceStub, task: task_pb2.TaskSpec) -> Any:
    return stub.SubmitTask.future(task_pb2.SubmitTaskRequest(spec=task), timeout=TIMEOUT)


def fill_the_statements(stub: task_pb2_grpc.TaskServiceStub, gate: Gate) -> list[Any]:
    """Two calls, each alone in one of the two statements hashd keeps in flight, both blocked."""
    calls: list[Any] = []

    def all_blocked() -> bool:
        return len(gate.blocked()) == len(calls)

    for n in (1, 2):
        calls.append(send(stub, spec(b"in-flight-%d" % n)))
        gate.until(all_blocked, f"{n} statements blocked")
    return calls


def queue_behind(stub: task_pb2_grpc.TaskServiceStub, gate: Gate, specs: list[Any]) -> list[Any]:
    """Calls queued in hashd in this order, behind the blocked statements."""
    calls: list[Any] = []

    def all_queued() -> bool:
        return gate.waiting_in_hashd() == len(calls)

    for task in specs:
        calls.append(send(stub, task))
        gate.until(all_queued, f"{len(calls)} calls queued in hashd")
    return calls


def code_of(call: Any) -> grpc.StatusCode:
    error = call.exception()
    return grpc.StatusCode.OK if error is None else error.code()


def reason_of(call: Any) -> str:
    status = rpc_status.from_call(call.exception())
    assert status is not None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason
    return ""


def stored(dsn: str) -> dict[str, tuple[int, str | None]]:
    """Every task row: id → (input size, idempotency key)."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT id::text, input_size, idempotency_key FROM hashmesh_tasks")
        return {task_id: (size, key) for task_id, size, key in rows.fetchall()}


def test_concurrent_single_submits_share_commits_and_each_lands_once(
    gated: Callable[[int], Gated], dsn: str
) -> None:
    stub, gate = gated(1000)
    gate.hold()
    first = fill_the_statements(stub, gate)
    # Sent together, not one by one: they arrive while both statements are blocked.
    specs = [
        spec(b"task-%03d" % i, **({"idempotency_key": f"k-{i}"} if i % 3 == 0 else {}))
        for i in range(150)
    ]
    rest = [send(stub, task) for task in specs]
    gate.until(lambda: gate.waiting_in_hashd() == len(rest), "every call queued in hashd")
    gate.release()
    answers = [call.result() for call in first + rest]
    assert all(a.created and a.task.status == task_pb2.TASK_STATUS_PENDING for a in answers)
    ids = [a.task.id for a in answers]
    assert len(set(ids)) == len(ids) == 152
    rows = stored(dsn)
    assert set(rows) == set(ids)  # every answer is a stored row, stored once
    for task, answer in zip(specs, answers[2:], strict=True):
        assert rows[answer.task.id] == (len(task.data), task.idempotency_key or None)
        assert answer.task.input_size == len(task.data)
        assert answer.task.idempotency_key == task.idempotency_key
        assert answer.task.created_at.seconds > 0 and answer.task.run_after.seconds > 0
    # 152 calls, far fewer statements: the queued ones went together.
    assert gate.statements() <= 2 + 150 // 2


def test_a_refused_call_in_a_shared_statement_fails_alone_and_replays_share_their_task(
    gated: Callable[[int], Gated], dsn: str
) -> None:
    stub, gate = gated(9)
    gate.hold()
    first = fill_the_statements(stub, gate)
    once, replay, reused, poison, plain_a, plain_b = queue_behind(
        stub,
        gate,
        [
            spec(b"same request", idempotency_key="same"),
            spec(b"same request", idempotency_key="same"),
            spec(b"another request", idempotency_key="same"),
            spec(b"refused by the database", idempotency_key="poison"),
            spec(b"plain-a"),
            spec(b"plain-b"),
        ],
    )
    # The per-client cap (9) counts the eight calls not yet answered: a ninth fits, a tenth
    # does not, however many statements are still open.
    ninth = send(stub, spec(b"ninth"))
    gate.until(lambda: gate.waiting_in_hashd() == 7, "the ninth call queued")
    over_cap = send(stub, spec(b"tenth"))
    assert code_of(over_cap) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(over_cap) == "CLIENT_QUEUE_FULL"
    invalid = send(stub, spec(b"bad", priority=1000))
    assert code_of(invalid) == grpc.StatusCode.INVALID_ARGUMENT
    gate.release()

    for call in (*first, once, plain_a, plain_b, ninth):
        assert call.result().created
    assert replay.result().task.id == once.result().task.id and not replay.result().created
    assert code_of(reused) == grpc.StatusCode.ALREADY_EXISTS
    assert code_of(poison) == grpc.StatusCode.INTERNAL
    rows = stored(dsn)
    assert set(rows) == {c.result().task.id for c in (*first, once, plain_a, plain_b, ninth)}
    assert [key for _, key in rows.values()].count("same") == 1
    assert "poison" not in [key for _, key in rows.values()]


def test_a_database_failure_mid_batch_answers_every_caller_unavailable(
    gated: Callable[[int], Gated], dsn: str
) -> None:
    stub, gate = gated(1000)
    gate.hold()
    first = fill_the_statements(stub, gate)
    batch = queue_behind(stub, gate, [spec(b"batched-%d" % i) for i in range(4)])
    # The two blocked statements lose their connections: nothing of theirs was committed.
    for pid in gate.blocked():
        gate.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    # The four queued calls go together in a fresh connection's statement; it loses its
    # connection too.
    gate.until(
        lambda: len(gate.blocked()) == 1 and gate.waiting_in_hashd() == 0,
        "the queued calls' statement blocked",
    )
    [pid] = gate.blocked()
    gate.conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
    for call in (*first, *batch):
        assert code_of(call) == grpc.StatusCode.UNAVAILABLE
        assert reason_of(call) == "DATABASE_UNAVAILABLE"
    gate.release()
    later = send(stub, spec(b"after the failure")).result()
    assert later.created
    assert set(stored(dsn)) == {later.task.id}  # nobody was told "accepted" for a lost row
