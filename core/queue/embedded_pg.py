"""An embedded PostgreSQL for ``hashctl up`` and the test bed when no database is configured.

Uses the server binaries shipped in the ``pgserver`` wheel (or, failing that, the system's
``initdb``/``postgres`` on PATH), runs ``postgres`` as a child process on a loopback TCP port
and keeps its data under a state directory.

It is private to whoever can read the state directory: every connection (TCP on 127.0.0.1,
no Unix socket) needs a password generated at the first start, checked with scram-sha-256
(``pg_hba.conf`` is rewritten at every start; no ``trust`` line), and kept in
``<data_dir>/password`` (mode 0600, in a 0700 directory). A data directory made by an older
version (trust auth) gets its password set in single-user mode, before the server listens.

PostgreSQL refuses to run as root, so as root the server runs as an unprivileged system user
(``pgserver``, created if missing, with its own primary group and no supplementary groups —
never group 0); the data directory is given to that user, and each parent directory of it
that others cannot traverse gets a POSIX ACL entry letting that user alone traverse it (on a
filesystem without ACLs: the traverse bit for everyone, ``o+x``, never read), each change
logged. That user owns the data directory, so root never follows a symlink in it: the files
root writes there (``password``, ``pg_hba.conf``, ``postgres.log``) are opened without
following one, and replaced rather than written through."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hashmesh.core.queue import posix_acl

log = logging.getLogger(__name__)

RUN_AS_WHEN_ROOT = "pgserver"
PASSWORD_FILE = "password"
"""Under the data directory: the generated password of the ``postgres`` role (mode 0600)."""
PG_HBA = """\
# Written by hashmesh at every start: every connection needs the generated password.
local all all scram-sha-256
host  all all 127.0.0.1/32 scram-sha-256
host  all all ::1/128 scram-sha-256
"""


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


@dataclass(frozen=True)
class ServerAccount:
    """Who the server runs as when we are root: an unprivileged user and its own group."""

    name: str
    uid: int
    gid: int


def _server_account() -> ServerAccount | None:
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(RUN_AS_WHEN_ROOT)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                RUN_AS_WHEN_ROOT,
            ],
            check=True,
            capture_output=True,
        )
        entry = pwd.getpwnam(RUN_AS_WHEN_ROOT)
    if entry.pw_uid == 0 or entry.pw_gid == 0:
        raise RuntimeError(
            f"user {RUN_AS_WHEN_ROOT!r} has uid or primary group 0; the embedded PostgreSQL "
            "will not run with root's privileges (give it its own group, or run as non-root)"
        )
    return ServerAccount(RUN_AS_WHEN_ROOT, entry.pw_uid, entry.pw_gid)


def _identity(account: ServerAccount | None) -> tuple[int | None, int | None, list[int] | None]:
    """``user``, ``group``, ``extra_groups`` for subprocess: as root, the server's user with its
    own group and no supplementary ones (``setgroups([])`` drops root's group 0)."""
    if account is None:
        return None, None, None
    return account.uid, account.gid, []


def _let_traverse(account: ServerAccount, path: Path) -> None:
    """Let ``account`` reach ``path`` through each of its parents (we are root here)."""
    for parent in reversed(path.parents):
        mode = parent.stat().st_mode
        if mode & 0o001:
            continue
        if posix_acl.grant_traverse(parent, account.uid):
            log.info(
                "let the embedded PostgreSQL's user traverse a directory (POSIX ACL entry)",
                extra={"directory": str(parent), "user": account.name},
            )
        else:  # a filesystem without ACLs
            parent.chmod(mode | 0o001)
            log.warning(
                "made a directory traversable by other users (o+x) so that the embedded "
                "PostgreSQL's user reaches its data",
                extra={"directory": str(parent), "user": account.name},
            )


def _open_path_for(account: ServerAccount, path: Path) -> None:
    """Let ``account`` traverse to ``path`` and own it (we are root here)."""
    _let_traverse(account, path)
    for item in [path, *path.rglob("*")]:
        os.chown(item, account.uid, account.gid, follow_symlinks=False)


def _open_here(path: Path, flags: int, mode: int = 0o600, *, replace: bool = False) -> int:
    """``os.open`` of a file under the data directory that never follows a symlink, in the
    name or its directory: as root, the server's user owns these directories and could point
    a name at a file of root's (``/etc/shadow``) for root to write or give away. ``replace``
    unlinks what is there first (a planted symlink or hard link) and creates a new file."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        if replace:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path.name, dir_fd=parent)
            flags |= os.O_CREAT | os.O_EXCL
        fd = os.open(path.name, flags | os.O_NOFOLLOW, mode, dir_fd=parent)
    finally:
        os.close(parent)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RuntimeError(f"{path} is not a regular file; remove it and start again")
    return fd


def _write_private(path: Path, text: str, account: ServerAccount | None) -> None:
    """Write ``text`` to a new ``path`` with mode 0600, owned by the server's user."""
    fd = _open_here(path, os.O_WRONLY, replace=True)
    with os.fdopen(fd, "w", encoding="ascii") as sink:
        os.fchmod(sink.fileno(), 0o600)
        if account is not None:
            os.fchown(sink.fileno(), account.uid, account.gid)
        sink.write(text)


def _make_binaries_usable(bin_dir: Path, account: ServerAccount) -> None:
    """pgserver unpacks its files readable by the owner only in some installs; the
    directories above them (a virtualenv under ``/root``) open to ``account`` alone."""
    root = bin_dir.parent
    for item in [root, *root.rglob("*")]:
        mode = item.stat().st_mode
        wanted = mode | 0o044 | (0o011 if item.is_dir() or mode & 0o100 else 0)
        if wanted != mode:
            item.chmod(wanted)
    _let_traverse(account, root)


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL server owned by this process. ``start()`` then ``stop()``; the data
    directory survives a stop so a later start finds the same database."""

    data_dir: Path
    port: int = 0
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    password: str = field(default="", repr=False)
    """Of the ``postgres`` role; read from (or made into) ``<data_dir>/password`` by start()."""
    log_path: Path | None = None
    """The server's log; ``None``: ``postgres.log`` in ``data_dir``."""
    preexec_fn: Callable[[], None] | None = None
    """Run in the server's process before exec (``hashctl up``: die with the supervisor)."""

    @property
    def log_file(self) -> Path:
        return self.log_path or self.data_dir / "postgres.log"

    @property
    def dsn(self) -> str:
        """Holds the password: pass it in the environment, never on a command line or a log."""
        return f"postgresql://postgres:{self.password}@{self.host}:{self.port}/postgres"

    @property
    def redacted_dsn(self) -> str:
        """The DSN to show: the password replaced by ``***``."""
        return f"postgresql://postgres:***@{self.host}:{self.port}/postgres"

    @property
    def password_file(self) -> Path:
        return self.data_dir / PASSWORD_FILE

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 30.0) -> str:
        bin_dir = _bin_dir()
        account = _server_account()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        if account is not None:
            _make_binaries_usable(bin_dir, account)
            _open_path_for(account, self.data_dir)
        pgdata = self.data_dir / "pgdata"
        user, group, extra_groups = _identity(account)
        if not (pgdata / "PG_VERSION").exists():
            if pgdata.exists():
                shutil.rmtree(pgdata)
            self.password = self._saved_password() or secrets.token_hex(24)
            _write_private(self.password_file, self.password + "\n", account)
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(pgdata),
                    "-U",
                    "postgres",
                    "--auth=scram-sha-256",
                    f"--pwfile={self.password_file}",
                    "--encoding=UTF8",
                    "--no-sync",
                ],
                check=True,
                capture_output=True,
                user=user,
                group=group,
                extra_groups=extra_groups,
            )
        else:
            self.password = self._saved_password() or self._set_new_password(
                bin_dir, pgdata, account
            )
        _write_private(pgdata / "pg_hba.conf", PG_HBA, account)
        if not self.port:
            self.port = free_port(self.host)
        log = self.log_file
        if log.is_symlink():  # planted by the server's user: root must not append through it
            log.unlink()
        log_fd = _open_here(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
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
                "password_encryption=scram-sha-256",
                "-c",
                "max_connections=400",
                "-c",
                "fsync=on",
                "-c",
                "shared_buffers=128MB",
                "-c",
                "synchronous_commit=on",
            ],
            stdout=log_fd,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            group=group,
            extra_groups=extra_groups,
            preexec_fn=self.preexec_fn,
        )
        os.close(log_fd)
        self._wait_ready(timeout)
        return self.dsn

    def _saved_password(self) -> str:
        """The saved password; ``""`` without a regular file (a symlink is not followed)."""
        try:
            fd = _open_here(self.password_file, os.O_RDONLY)
        except (FileNotFoundError, OSError, RuntimeError):
            return ""
        with os.fdopen(fd, encoding="ascii") as source:
            return source.read().strip()

    def _set_new_password(self, bin_dir: Path, pgdata: Path, account: ServerAccount | None) -> str:
        """A data directory without a password file (made with trust auth by an older version):
        set one in single-user mode, where nothing listens, then save it."""
        password = secrets.token_hex(24)
        user, group, extra_groups = _identity(account)
        subprocess.run(
            [str(bin_dir / "postgres"), "--single", "-D", str(pgdata), "postgres"],
            input=f"ALTER ROLE postgres PASSWORD '{password}';\n".encode(),
            check=True,
            capture_output=True,
            user=user,
            group=group,
            extra_groups=extra_groups,
        )
        _write_private(self.password_file, password + "\n", account)
        return password

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
