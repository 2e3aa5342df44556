"""No password at rest: what PostgreSQL's files hold after real argon2 tasks, what a database
writer can make a worker do with a sealed row, and the key rotation procedure of the README."""

from __future__ import annotations

import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest

from hashmesh.core.hashing.algorithms import argon2id_verify
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres
from hashmesh.core.queue.sealing import KEY_FILE_ENV, new_key_line
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from tests.cli_helpers import hashctl_json
from tests.conftest import Processes

ARGON2 = common_pb2.Argon2Params(
    time_cost=1, memory_cost_kib=8 * 1024, parallelism=1, salt=b"at-rest-salt"
)
FAST = {
    "HASHMESH_WORKERD_HEARTBEAT_SECONDS": "0.2",
    "HASHMESH_WORKERD_POLL_SECONDS": "0.3",
    "HASHMESH_TASK_RETRY_BASE": "0.05",
    "HASHMESH_TASK_RETRY_CAP": "0.1",
}


def argon2_spec(password: bytes, **fields: object) -> task_pb2.TaskSpec:
    return task_pb2.TaskSpec(
        algorithm=common_pb2.ALGORITHM_ARGON2ID, data=password, argon2=ARGON2, **fields
    )


def stub_of(address: str) -> task_pb2_grpc.TaskServiceStub:
    return task_pb2_grpc.TaskServiceStub(grpc.insecure_channel(address))


def wait_final(stub: task_pb2_grpc.TaskServiceStub, task_id: str) -> task_pb2.Task:
    deadline = time.monotonic() + 60
    while True:
        task = stub.GetTask(task_pb2.GetTaskRequest(id=task_id), timeout=10).task
        if task.status in (
            task_pb2.TASK_STATUS_SUCCEEDED,
            task_pb2.TASK_STATUS_DEAD_LETTER,
            task_pb2.TASK_STATUS_CANCELLED,
        ):
            return task
        assert time.monotonic() < deadline, f"task {task_id} not final: {task}"
        time.sleep(0.05)


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        assert time.monotonic() < deadline, f"not reached: {what}"
        time.sleep(0.05)


def occurrences(root: Path, needle: bytes) -> dict[str, int]:
    """Every file under ``root`` (heap, WAL, clog, logs, everything) holding ``needle``."""
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            count = path.read_bytes().count(needle)
            if count:
                found[str(path.relative_to(root))] = count
    return found


def key_file(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="ascii")
    path.chmod(0o600)
    return path


def test_no_file_of_the_database_holds_an_argon2_password(
    owned_pg: EmbeddedPostgres, procs: Processes
) -> None:
    marker = uuid.uuid4().hex
    done_password = f"pw-done-{marker}".encode()
    pending_password = f"pw-pending-{marker}".encode()
    control = f"control-in-clear-{marker}"
    hashd = procs.hashd(owned_pg.dsn, "--metrics-port", "0")
    worker = procs.workerd(owned_pg.dsn, "--metrics-port", "0", env=FAST)
    stub = stub_of(hashd.address)
    # The idempotency key is stored in clear, in the same row: the control that shows the scan
    # does reach the heap and the WAL where the task's row lives.
    done = stub.SubmitTask(
        task_pb2.SubmitTaskRequest(spec=argon2_spec(done_password, idempotency_key=control)),
        timeout=10,
    ).task
    later = task_pb2.TaskSpec()
    later.CopyFrom(argon2_spec(pending_password))
    later.run_after.FromSeconds(int(time.time()) + 3600)  # stays pending, sealed, in the table
    pending = stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=later), timeout=10).task

    final = wait_final(stub, done.id)
    assert final.status == task_pb2.TASK_STATUS_SUCCEEDED, final.last_error
    # The worker hashed the real password: it opened the sealed input.
    assert argon2id_verify(final.result.encoded, done_password)[0]
    with psycopg.connect(owned_pg.dsn, autocommit=True) as conn:
        # The worker stored the (salted, so deterministic) result in the shared cache: the scan
        # below covers a real cache entry too (keyed by an HMAC, valued by the output only).
        wait_until(
            lambda: (
                conn.execute(
                    "SELECT count(*) FROM hashmesh_cache WHERE octet_length(key) = 32"
                ).fetchone()
                == (1,)
            ),
            "the result is in the shared cache",
        )
        [(stored, key_id)] = conn.execute(
            "SELECT input, input_key_id FROM hashmesh_tasks WHERE id = %s", (pending.id,)
        ).fetchall()
        assert key_id == "k1" and pending_password not in bytes(stored)
        conn.execute("CHECKPOINT")
        conn.execute("SELECT pg_switch_wal()")
        conn.execute("CHECKPOINT")

    for password in (done_password, pending_password):
        assert occurrences(owned_pg.data_dir, password) == {}
    seen = occurrences(owned_pg.data_dir, control.encode())
    assert any(name.startswith("pgdata/pg_wal/") for name in seen), seen
    assert any(name.startswith("pgdata/base/") for name in seen), seen
    # Nor in what the processes printed, nor in their metrics.
    shown = [proc.log() for proc in procs.started] + [
        urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        for address in (hashd.addresses["hashd metrics"], worker.addresses["workerd metrics"])
    ]
    for text in shown:
        assert done_password.decode() not in text and pending_password.decode() not in text


def test_argon2_tasks_are_refused_by_a_replica_without_a_key(dsn: str, procs: Processes) -> None:
    hashd = procs.hashd(dsn, env={KEY_FILE_ENV: ""})
    stub = stub_of(hashd.address)
    with pytest.raises(grpc.RpcError) as refused:
        stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=argon2_spec(b"hunter2")), timeout=10)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "HASHMESH_TASK_KEY_FILE" in (refused.value.details() or "")
    assert "hunter2" not in (refused.value.details() or "")
    # Digests still work; their input is stored as given, without a key id.
    spec = task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"not a secret")
    stub.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute("SELECT algorithm, input, input_key_id FROM hashmesh_tasks").fetchall()
        assert rows == [("md5", b"not a secret", None)]
        # And the schema refuses a clear argon2 input from anyone else (an old hashd, a script).
        with pytest.raises(psycopg.errors.CheckViolation, match="secret_sealed"):
            conn.execute(
                "INSERT INTO hashmesh_tasks (algorithm, input, input_size) "
                "VALUES ('argon2id', 'hunter2', 7)"
            )


def test_a_row_downgraded_in_the_database_is_not_hashed(dsn: str, procs: Processes) -> None:
    """A database writer turns a sealed argon2 task into md5 (a fast hash of the password):
    the worker refuses to open it, and no digest of the password is ever written."""
    hashd = procs.hashd(dsn)
    stub = stub_of(hashd.address)
    task = stub.SubmitTask(
        task_pb2.SubmitTaskRequest(spec=argon2_spec(b"hunter2", max_attempts=1)), timeout=10
    ).task
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE hashmesh_tasks SET algorithm = 'md5', params = '{}' WHERE id = %s", (task.id,)
        )
    procs.workerd(dsn, env=FAST)
    final = wait_final(stub, task.id)
    assert final.status == task_pb2.TASK_STATUS_DEAD_LETTER
    assert final.last_error.startswith("TamperedInput: ") and "authentication" in final.last_error
    assert not final.HasField("result")
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT result_digest FROM hashmesh_tasks").fetchall() == [(None,)]


def test_key_rotation_as_the_readme_describes_it(
    dsn: str, procs: Processes, tmp_path: Path
) -> None:
    old, new = new_key_line("2026-01"), new_key_line("2026-07")
    before = key_file(tmp_path / "keys-old", old)
    rotated = key_file(tmp_path / "keys-rotated", new, old)
    only_new = key_file(tmp_path / "keys-new", new)

    def usage() -> dict[str, int]:
        """The check of the procedure: unfinished tasks per key id (`hashctl keys usage`)."""
        reply = hashctl_json("keys", "usage", "--dsn", dsn)
        return {row["key_id"]: row["unfinished"] for row in reply["keys"]}

    # A task sealed under the old key waits for a worker.
    first = procs.hashd(dsn, env={KEY_FILE_ENV: str(before)})
    sealed_old = (
        stub_of(first.address)
        .SubmitTask(task_pb2.SubmitTaskRequest(spec=argon2_spec(b"old-secret")), timeout=10)
        .task
    )
    # Steps 1-2: every process gets the ring with the new key first: new tasks use it.
    second = procs.hashd(dsn, "--task-key-file", str(rotated))  # the flag beats the variable
    stub = stub_of(second.address)
    sealed_new = stub.SubmitTask(
        task_pb2.SubmitTaskRequest(spec=argon2_spec(b"new-secret")), timeout=10
    ).task
    assert usage() == {"2026-01": 1, "2026-07": 1}
    # A worker that already dropped the old key cannot open the old row, and says which key.
    early = procs.workerd(dsn, "--task-key-file", str(only_new), env=FAST)
    assert wait_final(stub, sealed_new.id).status == task_pb2.TASK_STATUS_SUCCEEDED
    wait_until(
        lambda: (
            "2026-01" in stub.GetTask(task_pb2.GetTaskRequest(id=sealed_old.id)).task.last_error
        ),
        "the old row's attempt failed naming its key",
    )
    early.terminate()
    # Step 3: old rows still open with the old key.
    procs.workerd(dsn, env={**FAST, KEY_FILE_ENV: str(rotated)})
    final = wait_final(stub, sealed_old.id)
    assert final.status == task_pb2.TASK_STATUS_SUCCEEDED
    assert argon2id_verify(final.result.encoded, b"old-secret")[0]
    # Step 4: no row needs the old key any more; it can go.
    assert usage() == {}


def test_migration_0004_ends_clear_passwords_and_keeps_digest_inputs(pg_admin_dsn: str) -> None:
    from hashmesh.core.queue import migrations
    from hashmesh.core.queue.embedded_pg import create_database

    name = f"hm_m4_{uuid.uuid4().hex[:10]}"
    target = create_database(pg_admin_dsn, name)
    try:
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute(
                "CREATE TABLE hashmesh_schema_migrations (version integer PRIMARY KEY, "
                "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for migration in migrations.load_migrations():
                if migration.version < 4:  # as an older version left the schema
                    conn.execute(migration.sql.encode())
                    conn.execute(
                        "INSERT INTO hashmesh_schema_migrations VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
            conn.execute(
                "INSERT INTO hashmesh_tasks (algorithm, input, input_size) VALUES "
                "('argon2id', 'clear-password', 14), ('md5', 'clear-digest-input', 18)"
            )
        migrations.migrate(target)
        with psycopg.connect(target) as conn:
            rows = conn.execute(
                "SELECT algorithm, status, input, last_error FROM hashmesh_tasks ORDER BY algorithm"
            ).fetchall()
        assert rows[0][:3] == ("argon2id", "dead_letter", None)
        assert "migration 0004" in rows[0][3] and "submit the task again" in rows[0][3]
        assert rows[1][:3] == ("md5", "pending", b"clear-digest-input")
    finally:
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
