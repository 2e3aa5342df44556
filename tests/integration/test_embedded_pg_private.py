"""The embedded PostgreSQL is private: another local user cannot connect, read its password or
its data; the server does not run with root's group; a data directory from before (trust
auth) is closed at its next start."""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from hashmesh.core.embedded_pg import PASSWORD_FILE, EmbeddedPostgres

# Runs as another user: everything it tries must fail (JSON of what happened, per attempt).
ATTACKER = r"""
import json, sys
import psycopg
port, data_dir, password_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
tried = {}
for name, dsn in {
    "tcp_no_password": f"postgresql://postgres@127.0.0.1:{port}/postgres",
    "tcp_guessed_password": f"postgresql://postgres:postgres@127.0.0.1:{port}/postgres",
    "other_role": f"postgresql://nobody@127.0.0.1:{port}/postgres",
    "unix_socket": f"postgresql://postgres@/postgres?host={data_dir}&port={port}",
    "unix_socket_tmp": f"postgresql://postgres@/postgres?host=/tmp&port={port}",
}.items():
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            tried[name] = "connected as " + conn.execute("SELECT current_user").fetchone()[0]
    except psycopg.Error as exc:
        tried[name] = "refused: " + str(exc).strip().splitlines()[-1]
for name, path in {"password_file": password_file, "data_dir": data_dir}.items():
    try:
        open(path, "rb").read() if name == "password_file" else __import__("os").listdir(path)
        tried[name] = "read"
    except OSError as exc:
        tried[name] = "refused: " + type(exc).__name__
print(json.dumps(tried))
"""


def as_nobody() -> None:
    entry = pwd.getpwnam("nobody")
    os.setgroups([])
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)


def run_as_nobody(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` as ``nobody``, with our psycopg: the first interpreter that user may
    run (ours may live under root's 0700 home)."""
    env = {"PYTHONPATH": str(Path(psycopg.__file__).parent.parent), "PATH": "/usr/bin:/bin"}
    for python in dict.fromkeys([sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]):
        try:
            probe = subprocess.run(
                [python, "-c", "import psycopg"], capture_output=True, env=env, timeout=60,
                preexec_fn=as_nobody, cwd="/",
            )  # fmt: skip
        except OSError:
            continue
        if probe.returncode == 0:
            return subprocess.run(
                [python, "-c", code, *args], capture_output=True, text=True, env=env,
                timeout=60, preexec_fn=as_nobody, cwd="/",
            )  # fmt: skip
    pytest.skip("no Python interpreter that user nobody can run with psycopg")


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another local user needs root")
def test_another_local_user_cannot_connect_nor_read_the_password(
    owned_pg: EmbeddedPostgres,
) -> None:
    run = run_as_nobody(
        ATTACKER, str(owned_pg.port), str(owned_pg.data_dir), str(owned_pg.password_file)
    )
    assert run.returncode == 0, run.stderr
    tried = json.loads(run.stdout)
    assert all(outcome.startswith("refused") for outcome in tried.values()), tried
    assert "no password supplied" in tried["tcp_no_password"]
    assert "password authentication failed" in tried["tcp_guessed_password"]
    assert tried["password_file"] == tried["data_dir"] == "refused: PermissionError"
    # The owner still can: the mesh's own processes connect with the generated password.
    with psycopg.connect(owned_pg.dsn) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_no_trust_and_private_state_files(owned_pg: EmbeddedPostgres) -> None:
    hba = (owned_pg.data_dir / "pgdata" / "pg_hba.conf").read_text()
    rules = [line.split() for line in hba.splitlines() if line.strip() and line[0] != "#"]
    assert rules and all(rule[-1] == "scram-sha-256" for rule in rules), rules
    assert stat.S_IMODE(owned_pg.data_dir.stat().st_mode) == 0o700
    for name in (PASSWORD_FILE, "postgres.log"):
        assert stat.S_IMODE((owned_pg.data_dir / name).stat().st_mode) == 0o600
    assert owned_pg.password and owned_pg.password not in repr(owned_pg)
    assert owned_pg.password not in owned_pg.redacted_dsn
    with psycopg.connect(owned_pg.dsn) as conn:
        [(listen, sockets)] = conn.execute(
            "SELECT current_setting('listen_addresses'), current_setting('unix_socket_directories')"
        ).fetchall()
    assert (listen, sockets) == ("127.0.0.1", "")


def _status(pid: int) -> dict[str, str]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_server_and_its_backends_run_without_group_zero(owned_pg: EmbeddedPostgres) -> None:
    assert owned_pg.pid is not None
    with psycopg.connect(owned_pg.dsn) as conn:  # a backend of our own, alive while we look
        backend = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert backend is not None
        for pid in (owned_pg.pid, backend[0]):
            status = _status(pid)
            gids = {int(g) for g in status["Gid"].split()}
            groups = {int(g) for g in status["Groups"].split()}
            assert 0 not in gids | groups, status
            if os.geteuid() == 0:  # run as the unprivileged server user, not as root
                assert {int(u) for u in status["Uid"].split()} != {0}, status


def test_a_data_directory_from_before_gets_a_password_before_it_listens(
    tmp_path: Path,
) -> None:
    server = EmbeddedPostgres(data_dir=tmp_path / "old-pg")
    server.start()
    server.stop()
    # As an older version left it: trust for everyone on loopback, and no password file.
    pgdata = server.data_dir / "pgdata"
    (pgdata / "pg_hba.conf").write_text("host all all 127.0.0.1/32 trust\n")
    server.password_file.unlink()
    reopened = EmbeddedPostgres(data_dir=server.data_dir)
    reopened.start()
    try:
        assert reopened.password and reopened.password != server.password
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(f"postgresql://postgres@127.0.0.1:{reopened.port}/postgres")
        with psycopg.connect(reopened.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        reopened.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="the server runs as another user only as root")
def test_as_root_a_private_parent_opens_to_the_server_user_alone(tmp_path: Path) -> None:
    private = tmp_path / "home"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    server = EmbeddedPostgres(data_dir=private / "state" / "postgres")
    server.start()
    try:
        with psycopg.connect(server.dsn) as conn:  # the server's user reached its data
            assert conn.execute("SELECT 1").fetchone() == (1,)
        assert not private.stat().st_mode & 0o001, "a private parent was opened to every user"
        probe = run_as_nobody(
            "import os, sys\ntry:\n    os.stat(sys.argv[1]); print('reached')\n"
            "except PermissionError:\n    print('refused')",
            str(private / "state"),
        )
        assert probe.stdout.strip() == "refused", probe.stderr
    finally:
        server.stop()
