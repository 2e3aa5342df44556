"""hashctl against one real hashd: commands, --json output, and every error path's exit code."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from hashmesh.cli.client import ExitCode
from hashmesh.core.queue.embedded_pg import create_database, free_port
from tests.cli_helpers import hashctl, hashctl_json
from tests.conftest import Processes


@pytest.fixture(scope="module")
def cli_dsn(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    name = f"hm_cli_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_admin_dsn, name, template=pg_template)
    yield dsn
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def target(cli_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One hashd for the whole module (the commands only need a target)."""
    processes = Processes(log_dir=tmp_path_factory.mktemp("cli-hashd"))
    try:
        yield processes.hashd(cli_dsn).address
    finally:
        processes.stop_all()


def test_hash_text_prints_the_digest(target: str) -> None:
    result = hashctl("--target", target, "hash", "sha256", "hello")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(b"hello").hexdigest()
    data = hashctl_json("--target", target, "hash", "MD5", "hello")
    assert data["encoded"] == hashlib.md5(b"hello").hexdigest()
    assert data["algorithm"] == "md5" and data["bytes"] == 5 and data["cached"] is False


def test_hash_file_and_stdin_are_streamed(target: str, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 8192 + b"tail"  # 2 MiB + 4 bytes: several chunks
    path = tmp_path / "input.bin"
    path.write_bytes(payload)
    data = hashctl_json("--target", target, "hash", "sha512", "--file", str(path))
    assert data["encoded"] == hashlib.sha512(payload).hexdigest()
    assert data["bytes"] == len(payload)
    piped = hashctl("--target", target, "hash", "blake2b", "-", input=payload)
    assert piped.exit_code == 0, piped.stderr
    assert piped.stdout.strip() == hashlib.blake2b(payload).hexdigest()


def test_argon2_hash_then_verify(target: str) -> None:
    args = ["--time-cost", "1", "--memory-cost", "8192", "--parallelism", "1", "--salt", "saltsalt"]
    phc = hashctl_json("--target", target, "hash", "argon2id", "-", *args, input="pw")["encoded"]
    assert phc.startswith("$argon2id$v=19$m=8192,t=1,p=1$")
    assert (
        hashctl_json("--target", target, "verify", "argon2id", phc, "-", input="pw")["match"]
        is True
    )
    wrong = hashctl("--target", target, "verify", "argon2id", phc, "nope")
    assert wrong.exit_code == ExitCode.MISMATCH and wrong.stdout.strip() == "no match"
    digest = hashlib.sha256(b"hello").hexdigest()
    assert hashctl("--target", target, "verify", "sha256", digest, "hello").exit_code == 0


def test_invalid_argument_from_the_server_exits_4(target: str) -> None:
    result = hashctl("--target", target, "hash", "argon2id", "pw", "--time-cost", "1000")
    assert result.exit_code == ExitCode.INVALID_ARGUMENT
    assert result.stderr.startswith("error: INVALID_ARGUMENT: ") and "time_cost" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_algorithm_exits_4_without_a_call() -> None:
    result = hashctl("--target", "127.0.0.1:1", "hash", "crc32", "x")
    assert result.exit_code == ExitCode.INVALID_ARGUMENT and "unknown algorithm" in result.stderr


def test_unreachable_target_exits_3() -> None:
    dead = f"127.0.0.1:{free_port()}"
    result = hashctl("--target", dead, "--timeout", "3", "hash", "sha256", "x")
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert result.stderr.startswith("error: UNAVAILABLE: cannot reach " + dead)
    assert "Traceback" not in result.stderr
    admin = hashctl("--admin-target", dead, "--timeout", "3", "lb", "backends")
    assert admin.exit_code == ExitCode.UNAVAILABLE and dead in admin.stderr


def test_unknown_task_exits_5(target: str) -> None:
    result = hashctl("--target", target, "task", "get", str(uuid.uuid4()))
    assert result.exit_code == ExitCode.NOT_FOUND, (result.stdout, result.stderr)
    assert result.stderr.startswith("error: NOT_FOUND")


def test_submit_then_get(target: str) -> None:
    submitted = hashctl_json(
        "--target", target, "--client-id", "cli-test", "submit", "md5", "hello", "--priority", "5"
    )
    # --client-id is a claim only a trusted proxy may make: the task is the caller's address's.
    assert submitted["status"] == "pending" and submitted["client_id"] == "ip:127.0.0.1"
    got = hashctl_json("--target", target, "task", "get", submitted["id"])
    assert got["id"] == submitted["id"] and got["algorithm"] == "md5" and got["priority"] == 5
    plain = hashctl("--target", target, "task", "get", submitted["id"])
    assert f"id: {submitted['id']}" in plain.stdout


def test_health_and_usage_errors(target: str) -> None:
    data = hashctl_json("--target", target, "health")
    assert data["status"] == "SERVING"
    assert hashctl("--target", target, "health", "hashmesh.v1.HashService").exit_code == 0
    missing = hashctl("--target", target, "hash", "sha256", input=b"")
    assert missing.exit_code == 0  # empty stdin is a valid (empty) input
    assert missing.stdout.strip() == hashlib.sha256(b"").hexdigest()
    both = hashctl("--target", target, "hash", "sha256", "x", "--file", "/etc/hostname")
    assert both.exit_code == ExitCode.USAGE


def test_db_migrate(cli_dsn: str) -> None:
    data = hashctl_json("db", "migrate", "--dsn", cli_dsn)
    assert data["applied"] == [] and data["version"] >= 1
    unreachable = hashctl(
        "db", "migrate", "--dsn", f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    )
    assert unreachable.exit_code == ExitCode.UNAVAILABLE and "Traceback" not in unreachable.stderr
