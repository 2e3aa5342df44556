"""The attacks of issue 10 items 6-7, measured: copies of an argon2 password in PostgreSQL's
files once its task has finished, and what another local user (``nobody``) can do with the
embedded PostgreSQL. Runs against whichever hashmesh is installed, so the same script gives the
"before" (an older checkout's venv) and the "after" figures:

    python bench/secrets_at_rest.py            # as root (becoming nobody needs it)

Starts an embedded PostgreSQL, one hashd and one workerd (real processes, loopback, a key file
in HASHMESH_TASK_KEY_FILE), submits argon2id tasks with a distinctive password, waits for them
to succeed, runs VACUUM, CHECKPOINT and a WAL switch, then scans every file of the data
directory. Everything it starts, it stops."""

from __future__ import annotations

import base64
import json
import os
import pwd
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc
import psycopg

from hashmesh.core.queue import migrations
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc

TASKS = 3
NOBODY = r"""
import json, subprocess, sys
import psycopg
port = int(sys.argv[1])
out = {}
try:
    with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=5,
                         autocommit=True) as conn:
        out["connect"] = "connected as " + conn.execute("SELECT current_user").fetchone()[0]
        out["pending_inputs_readable"] = conn.execute(
            "SELECT count(*) FROM hashmesh_tasks WHERE input IS NOT NULL").fetchone()[0]
        conn.execute("CREATE TEMP TABLE o (line text)")
        conn.execute("COPY o FROM PROGRAM 'id'")
        out["copy_from_program_id"] = conn.execute("SELECT line FROM o").fetchone()[0]
except psycopg.Error as exc:
    out["connect"] = "refused: " + str(exc).strip().splitlines()[-1]
print(json.dumps(out))
"""


def _start(argv: list[str], env: dict[str, str], log: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", *argv],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    with log.open("w") as sink:
        for line in process.stdout:
            sink.write(line)
            found = re.match(r"^\w+ (?:listening on|ready as) (\S+)$", line.strip())
            if found:
                return process, found.group(1)
    raise RuntimeError(f"{argv[0]} did not start: {log.read_text()[-2000:]}")


def _as_nobody() -> None:
    entry = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def _nobody(port: int) -> dict[str, object]:
    if os.geteuid() != 0:
        return {"skipped": "not root"}
    env = {"PYTHONPATH": str(Path(psycopg.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        ["/usr/bin/python3", "-c", NOBODY, str(port)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        preexec_fn=_as_nobody,
        cwd="/",
    )
    return json.loads(run.stdout) if run.returncode == 0 else {"error": run.stderr[-500:]}


def _groups(pid: int) -> str:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return " | ".join(line for line in lines if line.startswith(("Uid:", "Gid:", "Groups:")))


def _copies(root: Path, needle: bytes) -> dict[str, int]:
    where = {"heap (base/)": 0, "WAL (pg_wal/)": 0, "elsewhere": 0}
    for path in root.rglob("*"):
        if path.is_file() and not path.is_symlink():
            count = path.read_bytes().count(needle)
            relative = path.relative_to(root).as_posix()
            kind = (
                "heap (base/)"
                if "/base/" in f"/{relative}"
                else "WAL (pg_wal/)"
                if "/pg_wal/" in f"/{relative}"
                else "elsewhere"
            )
            where[kind] += count
    return where


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="hm-secrets-"))
    server = EmbeddedPostgres(data_dir=work / "pg")
    children: list[subprocess.Popen[str]] = []
    try:
        dsn = server.start()
        migrations.migrate(dsn)
        key_file = work / "task-keys"
        key_file.write_text(f"bench:{base64.b64encode(os.urandom(32)).decode()}\n")
        key_file.chmod(0o600)
        env = {
            **os.environ,
            "HASHMESH_DATABASE_URL": dsn,
            "HASHMESH_TASK_KEY_FILE": str(key_file),
            "HASHMESH_IDENTITY_SECRET": os.urandom(24).hex(),
            "PYTHONUNBUFFERED": "1",
        }
        hashd, address = _start(
            ["hashmesh.hashd", "--listen", "127.0.0.1:0"], env, work / "hashd.log"
        )
        children.append(hashd)
        worker, _ = _start(["hashmesh.workerd"], env, work / "workerd.log")
        children.append(worker)
        password = f"pw-{uuid.uuid4().hex}".encode()
        params = common_pb2.Argon2Params(time_cost=1, memory_cost_kib=8192, parallelism=1)
        with grpc.insecure_channel(address) as channel:
            stub = task_pb2_grpc.TaskServiceStub(channel)
            ids = [
                stub.SubmitTask(
                    task_pb2.SubmitTaskRequest(
                        spec=task_pb2.TaskSpec(
                            algorithm=common_pb2.ALGORITHM_ARGON2ID, data=password, argon2=params
                        )
                    ),
                    timeout=10,
                ).task.id
                for _ in range(TASKS)
            ]
            deadline = time.monotonic() + 60
            while any(
                stub.GetTask(task_pb2.GetTaskRequest(id=i), timeout=10).task.status
                != task_pb2.TASK_STATUS_SUCCEEDED
                for i in ids
            ):
                assert time.monotonic() < deadline, "tasks did not succeed"
                time.sleep(0.1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            visible = conn.execute(
                "SELECT count(*) FROM hashmesh_tasks WHERE input IS NOT NULL"
            ).fetchone()
            conn.execute("VACUUM hashmesh_tasks")
            conn.execute("CHECKPOINT")
            conn.execute("SELECT pg_switch_wal()")
            conn.execute("CHECKPOINT")
        copies = _copies(server.data_dir, password)
        print(
            f"argon2id tasks: {TASKS} succeeded; rows with an input in SQL: {visible[0] if visible else '?'}"
        )
        print(f"copies of the password in the data directory: {sum(copies.values())} {copies}")
        assert server.pid is not None
        print(f"postgres server identity: {_groups(server.pid)}")
        print(f"as nobody: {json.dumps(_nobody(server.port))}")
    finally:
        for child in children:
            child.terminate()
            child.wait(20)
        server.stop()


if __name__ == "__main__":
    main()
