"""An embedded PostgreSQL for ``hashctl up`` and the test bed when no database is configured.

Uses the server binaries shipped in the ``pgserver`` wheel (or, failing that, the system's
``initdb``/``postgres`` on PATH), runs ``postgres`` as a child process on a loopback TCP port
and keeps its data under a state directory. PostgreSQL refuses to run as root, so as root the
server runs as an unprivileged system user (``pgserver``, created if missing)."""

from __future__ import annotations

import importlib.util
import logging
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUN_AS_WHEN_ROOT = "pgserver"


def _bin_dir() -> Path:
    # Found without importing pgserver: its import has side effects (lock files, warnings).
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (candidate / "postgres").exists():
            return candidate
    found = shutil.which("initdb")
    if not found:
        raise RuntimeError("no PostgreSQL binaries: install pgserver or PostgreSQL")
    return Path(found).resolve().parent


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _run_as_user() -> str | None:
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(RUN_AS_WHEN_ROOT)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                RUN_AS_WHEN_ROOT,
            ],
            check=True,
            capture_output=True,
        )
    return RUN_AS_WHEN_ROOT


def _open_path_for(user: str, path: Path) -> None:
    """Let ``user`` traverse to ``path`` and own it (we are root here)."""
    entry = pwd.getpwnam(user)
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)
    for item in [path, *path.rglob("*")]:
        os.chown(item, entry.pw_uid, entry.pw_gid)


def _make_binaries_usable(bin_dir: Path) -> None:
    """pgserver unpacks its files readable by the owner only in some installs."""
    root = bin_dir.parent
    for item in [root, *root.rglob("*")]:
        mode = item.stat().st_mode
        wanted = mode | 0o044 | (0o011 if item.is_dir() or mode & 0o100 else 0)
        if wanted != mode:
            item.chmod(wanted)
    for parent in root.parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            parent.chmod(mode | 0o011)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server owned by this process. ``start()`` then ``stop()``; the data
    directory survives a stop so a later start finds the same database."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    """The server's log; ``None``: ``postgres.log`` in ``data_dir``."""
    preexec_fn: Callable[[], None] | None = None
    """Run in the server's process before exec (``hashctl up``: die with the supervisor)."""

    @property
    def log_file(self) -> Path:
        return self.log_path or self.data_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30.0) -> str:
        bin_dir = _bin_dir()
        user = _run_as_user()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user:
            _make_binaries_usable(bin_dir)
            _open_path_for(user, self.data_dir)
        pgdata = self.data_dir / "pgdata"
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=user,
            )
        if not self.port:
            self.port = free_port(self.host)
        log_file = open(self.log_file, "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [
                str(bin_dir / "postgres"),
                "-D",
                str(pgdata),
                "-h",
                self.host,
                "-p",
                str(self.port),
                "-k",
                "",
                "-c",
                "max_connections=400",
                "-c",
                "fsync=on",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "synchronous_commit=on",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            user=user,
            start_new_session=True,
            preexec_fn=self.preexec_fn,
        )
        log_file.close()
        self._wait_ready(timeout)
        return self.dsn

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_file.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"embedded PostgreSQL exited at start:\n{tail}")
            try:
                with psycopg.connect(self.dsn, connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, timeout: float = 20.0) -> None:
        """Fast shutdown (SIGINT: abort sessions, checkpoint, exit); SIGKILL as a last resort."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    def kill(self) -> None:
        """Crash the server (SIGKILL to the postmaster); for fault tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
            # Orphaned backends exit on their own once the postmaster is gone.


def create_database(admin_dsn: str, name: str, template: str | None = None) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(admin_dsn, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
        if template:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(name), sql.Identifier(template)
                )
            )
        else:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    base, _, _ = admin_dsn.rpartition("/")
    query = ""
    if "?" in admin_dsn:
        query = "?" + admin_dsn.split("?", 1)[1]
        base = admin_dsn.split("?", 1)[0].rpartition("/")[0]
    return f"{base}/{name}{query}"
