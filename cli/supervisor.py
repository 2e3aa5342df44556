"""The supervisor behind ``hashctl up``: starts the local mesh's processes in order, restarts
a child that crashes (with backoff), and stops them in the reverse order of dependence
(balancer, workers, replicas, then the database). No terminal output here: every change is
reported to an ``on_event`` callback, so display stays in ``hashmesh.cli.up``."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import logging
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hashmesh.core.backoff import RESTART
from hashmesh.core.queue.db import redact_dsn
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres, free_port
from hashmesh.core.queue.sealing import KEY_FILE_ENV, KEYS_ENV, ensure_key_file

log = logging.getLogger(__name__)

_ANNOUNCE = re.compile(r"^(?P<name>[\w -]+?) (?:listening on|ready as) (?P<address>\S+)$")
STOP_ORDER = ("balancer", "workerd", "hashd")
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
STABLE_AFTER = 30.0
"""A child that ran this long before crashing restarts with the first backoff again."""
CACHE_SECRET_FILE = "cache-secret"
"""Under the state directory: the HMAC secret of the mesh's result cache (mode 0600)."""
TASK_KEY_FILE = "task-keys"
"""Under the state directory: the keys sealing task inputs at rest (mode 0600)."""
IDENTITY_SECRET_FILE = "identity-secret"
"""Under the state directory: the mesh's ``HASHMESH_IDENTITY_SECRET`` (mode 0600), kept so that
idempotency fingerprints stay comparable across runs."""

Event = dict[str, Any]


@dataclass(frozen=True)
class MeshPlan:
    """What ``hashctl up`` runs."""

    state_dir: Path
    """Holds the embedded database's data and each process's log."""
    database_url: str | None = None
    """An existing PostgreSQL; ``None`` starts an embedded one under ``state_dir``."""
    replicas: int = 3
    workers: int = 1
    host: str = "127.0.0.1"
    port: int = 50050
    """Public (balancer) port; 0 picks a free one."""
    admin_port: int = 50060
    """AdminService port; 0 picks a free one."""
    strategy: str | None = None
    """Balancer strategy (``round_robin``, ...); ``None`` keeps the balancer's default."""
    balancers: int = 1
    """Balancer processes sharing the public port (SO_REUSEPORT); the first one's admin
    listener is ``admin_port``, the others' are free ports (AdminService acts per process)."""
    metrics: bool = False
    """Every child also serves Prometheus /metrics on a free loopback port (kept across
    restarts); the addresses show as ``<kind> metrics``."""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.workers < 0 or self.balancers < 1:
            raise ValueError("need --replicas >= 1, --workers >= 0 and --balancers >= 1")


PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int, parent: int) -> None:
    """Runs in a child before exec (Linux): the kernel sends it ``signum`` when the thread that
    started it dies, however the supervisor dies (``kill -9``, a closed terminal). Children
    are started from threads that live as long as the supervisor: the event loop's, or the
    default executor's (for the database)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signum)
    if os.getppid() != parent:  # the supervisor died before the line above
        os.kill(os.getpid(), signum)


def _children_die_with_us(signum: int) -> Callable[[], None] | None:
    return (
        functools.partial(_die_with_parent, signum, os.getpid())
        if sys.platform == "linux"
        else None
    )


@dataclass
class Child:
    """One supervised process. Its address stays the same across restarts."""

    name: str
    kind: str
    argv: list[str]
    expect: tuple[str, ...]
    log_path: Path
    addresses: dict[str, str] = field(default_factory=dict)
    state: str = "pending"
    restarts: int = 0
    process: asyncio.subprocess.Process | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pump: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def address(self) -> str:
        return ", ".join(self.addresses.values())


class StartupError(RuntimeError):
    """A process did not come up when the mesh started; the message holds its log's tail."""


class Supervisor:
    def __init__(self, plan: MeshPlan, on_event: Callable[[Event], None]) -> None:
        self.plan = plan
        self.on_event = on_event
        self.children: list[Child] = []
        self.database: EmbeddedPostgres | None = None
        self._database_start: asyncio.Future[str] | None = None
        self.dsn = plan.database_url or ""
        self.stopping = False
        self._watchers: list[asyncio.Task[None]] = []
        self.logs = plan.state_dir / "logs"
        self.target = ""
        self.admin_target = ""
        self.cache_secret = ""
        self.task_key_file: Path | None = None
        self.identity_secret = ""

    # ---- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        if not os.environ.get("HASHMESH_CACHE_SECRET"):  # the user's own secret wins
            self.cache_secret = load_cache_secret(self.plan.state_dir)
        if not (os.environ.get(KEY_FILE_ENV) or os.environ.get(KEYS_ENV)):  # the user's keys win
            self.task_key_file = ensure_key_file(self.plan.state_dir / TASK_KEY_FILE)
        if not os.environ.get(
            "HASHMESH_IDENTITY_SECRET"
        ):  # signs identity stamps; keys fingerprints
            self.identity_secret = load_cache_secret(self.plan.state_dir, IDENTITY_SECRET_FILE)
        if not self.plan.database_url:
            await self._start_database()
        self.emit("migrating", name="schema")
        from hashmesh.core.queue import migrations

        await asyncio.to_thread(migrations.migrate, self.dsn)
        host = self.plan.host
        replicas = [
            self._child(
                "hashd",
                f"hashd-{i}",
                ["hashmesh.hashd", "--listen", f"{host}:{free_port(host)}", *self._metrics_flag()],
                ("hashd", *self._metrics_line("hashd")),
            )
            for i in range(1, self.plan.replicas + 1)
        ]
        await asyncio.gather(*(self._launch(child) for child in replicas))
        port = self.plan.port or free_port(host)
        admin_port = self.plan.admin_port or free_port(host)
        self.target, self.admin_target = f"{host}:{port}", f"{host}:{admin_port}"
        backends = ",".join(child.addresses["hashd"] for child in replicas)
        shared_port = ["--reuse-port"] if self.plan.balancers > 1 else []
        balancers = [
            self._child(
                "balancer",
                "balancer" if i == 1 else f"balancer-{i}",
                [
                    "hashmesh.balancer",
                    "--listen",
                    self.target,
                    *shared_port,
                    "--admin-listen",
                    self.admin_target if i == 1 else f"{host}:{free_port(host)}",
                    "--backends",
                    backends,
                    # One state file per process: each keeps what was set on its own admin listener.
                    "--state-file",
                    str(
                        self.plan.state_dir
                        / ("balancer-state.json" if i == 1 else f"balancer-{i}-state.json")
                    ),
                    *(["--strategy", self.plan.strategy] if self.plan.strategy else []),
                    # Each process pinned to a CPU of its own (balancer.affinity), while any.
                    "--cpu-index",
                    str(i - 1),
                    *self._metrics_flag(),
                ],
                ("balancer", "balancer admin", *self._metrics_line("balancer")),
            )
            for i in range(1, self.plan.balancers + 1)
        ]
        await asyncio.gather(*(self._launch(child) for child in balancers))
        workers = [
            self._child(
                "workerd",
                f"workerd-{i}",
                ["hashmesh.workerd", *self._metrics_flag()],
                ("workerd", *self._metrics_line("workerd")),
            )
            for i in range(1, self.plan.workers + 1)
        ]
        await asyncio.gather(*(self._launch(child) for child in workers))

    def _metrics_flag(self) -> list[str]:
        return ["--metrics-port", str(free_port(self.plan.host))] if self.plan.metrics else []

    def _metrics_line(self, kind: str) -> tuple[str, ...]:
        return (f"{kind} metrics",) if self.plan.metrics else ()

    async def _start_database(self) -> None:
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM would wait for every client to leave).
        self.database = EmbeddedPostgres(
            data_dir=self.plan.state_dir / "postgres",
            log_path=self.logs / "postgres.log",
            preexec_fn=_children_die_with_us(signal.SIGINT),
        )
        stale = await asyncio.to_thread(stop_stale_server, self.database.data_dir / "pgdata")
        if stale:
            self.emit("stopped", name="postgres", pid=stale, reason="left running by an earlier up")
        self.emit("starting", name="postgres")
        # Shielded: a stop during start-up waits for the server to be up, then stops it.
        self._database_start = asyncio.get_running_loop().run_in_executor(None, self.database.start)
        try:
            self.dsn = await asyncio.shield(self._database_start)
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            # The server (or a set-up step) exited: its own words, not the whole log.
            log_path = self.database.log_file
            output = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else None
            said = output.decode(errors="replace") if isinstance(output, bytes) else ""
            raise StartupError(
                f"PostgreSQL did not start (log {log_path}):\n"
                f"{_reasons_in(said) or _reasons(log_path)}"
            ) from exc
        self.emit(
            "running",
            name="postgres",
            pid=self.database.pid,
            address=f"{self.database.host}:{self.database.port}",
            dsn=redact_dsn(self.dsn),
        )

    def _child(self, kind: str, name: str, argv: list[str], expect: tuple[str, ...]) -> Child:
        child = Child(
            name=name, kind=kind, argv=argv, expect=expect, log_path=self.logs / f"{name}.log"
        )
        self.children.append(child)
        return child

    async def _spawn(self, child: Child) -> None:
        child.ready = asyncio.Event()
        child.state = "starting"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if child.kind in ("hashd", "workerd"):
            env["HASHMESH_DATABASE_URL"] = self.dsn  # not argv: every local user can read that
            if self.cache_secret:
                env["HASHMESH_CACHE_SECRET"] = self.cache_secret
            if self.task_key_file is not None:
                env[KEY_FILE_ENV] = str(self.task_key_file)
        if self.identity_secret and child.kind in ("hashd", "balancer"):
            env["HASHMESH_IDENTITY_SECRET"] = self.identity_secret
        child.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            *child.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env=env,
            # Own session: a Ctrl-C on the terminal reaches only us, so we stop children in order.
            start_new_session=True,
            preexec_fn=_children_die_with_us(signal.SIGTERM),
        )
        self.emit("starting", name=child.name, pid=child.pid)
        child.pump = asyncio.create_task(self._pump(child, child.process))
        self._watchers.append(child.pump)

    async def _pump(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """Copy the child's output to its log and note its ``listening on`` lines."""
        assert process.stdout is not None
        found: dict[str, str] = {}
        with open(child.log_path, "ab") as sink:
            async for raw in process.stdout:
                sink.write(raw)
                sink.flush()
                match = _ANNOUNCE.match(raw.decode(errors="replace").strip())
                if match and match.group("name") in child.expect:
                    found[match.group("name")] = match.group("address")
                    if set(child.expect) <= set(found):
                        child.addresses = dict(found)
                        child.ready.set()

    async def _launch(self, child: Child) -> None:
        """Start ``child`` at mesh start-up and wait until it announces readiness; watch it
        afterwards. A child that does not come up fails the start-up (no restart loop)."""
        await self._spawn(child)
        assert child.process is not None
        process = child.process
        exited = asyncio.create_task(process.wait())
        ready = asyncio.create_task(child.ready.wait())
        await asyncio.wait(
            {exited, ready}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
        )
        if not child.ready.is_set():
            ready.cancel()
            await _terminate(process)
            if child.pump is not None:  # let the log catch up before quoting it
                await asyncio.wait({child.pump}, timeout=2)
            raise StartupError(
                f"{child.name} did not start (log {child.log_path}):\n{_tail(child.log_path)}"
            )
        exited.cancel()
        child.state = "running"
        self.emit(
            "running",
            name=child.name,
            pid=child.pid,
            address=child.address,
            addresses=dict(child.addresses),
        )
        self._watchers.append(asyncio.create_task(self._watch(child, process)))

    async def _watch(self, child: Child, process: asyncio.subprocess.Process) -> None:
        """Restart ``child`` when it exits on its own, with exponential backoff."""
        attempt = 0
        while True:
            started = asyncio.get_running_loop().time()
            code = await process.wait()
            if self.stopping:
                return
            child.state = "crashed"
            self.emit(
                "exited", name=child.name, pid=process.pid, code=code, log=str(child.log_path)
            )
            if asyncio.get_running_loop().time() - started > STABLE_AFTER:
                attempt = 0
            delay = RESTART.delay(attempt)
            attempt += 1
            child.state = "restarting"
            self.emit("restarting", name=child.name, delay=round(delay, 3))
            await asyncio.sleep(delay)
            if self.stopping:
                return
            child.restarts += 1
            await self._spawn(child)
            assert child.process is not None
            process = child.process
            waiter = asyncio.create_task(child.ready.wait())
            exited = asyncio.create_task(process.wait())
            await asyncio.wait(
                {waiter, exited}, timeout=READY_TIMEOUT, return_when=asyncio.FIRST_COMPLETED
            )
            waiter.cancel()
            exited.cancel()
            if child.ready.is_set():
                child.state = "running"
                self.emit(
                    "running",
                    name=child.name,
                    pid=child.pid,
                    address=child.address,
                    restarts=child.restarts,
                )
            elif process.returncode is None:
                await _terminate(process)

    # ---- database health -----------------------------------------------------------------
    async def watch_database(self) -> None:
        """Restart the embedded PostgreSQL if it dies (same data directory and port)."""
        attempt = 0
        while not self.stopping and self.database is not None:
            await asyncio.sleep(1.0)
            process = self.database.process
            if self.stopping or process is None or process.poll() is None:
                continue
            self.emit("exited", name="postgres", pid=process.pid, code=process.returncode)
            await asyncio.sleep(RESTART.delay(attempt))
            attempt += 1
            try:
                await asyncio.to_thread(self.database.start)
                attempt = 0
                self.emit(
                    "running",
                    name="postgres",
                    pid=self.database.pid,
                    address=f"{self.database.host}:{self.database.port}",
                )
            except Exception as exc:
                self.emit("restart_failed", name="postgres", error=str(exc).splitlines()[0])

    # ---- stop ----------------------------------------------------------------------------
    async def stop(self) -> None:
        """Balancer first, then workers, then replicas, the database last; nothing left behind."""
        self.stopping = True
        for kind in STOP_ORDER:
            group = [c for c in self.children if c.kind == kind and c.process is not None]
            for child in group:
                child.state = "stopping"
                self.emit("stopping", name=child.name, pid=child.pid)
            await asyncio.gather(*(_terminate(c.process) for c in group if c.process is not None))
            for child in group:
                child.state = "stopped"
                self.emit("stopped", name=child.name, pid=child.pid)
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        if self._database_start is not None:
            await asyncio.gather(self._database_start, return_exceptions=True)
        if self.database is not None and self.database.process is not None:
            pid = self.database.pid
            self.emit("stopping", name="postgres", pid=pid)
            await asyncio.to_thread(self.database.stop)
            self.emit("stopped", name="postgres", pid=pid)

    # ---- reporting -----------------------------------------------------------------------
    def emit(self, event: str, **fields: Any) -> None:
        self.on_event({"event": event, **fields})

    def rows(self) -> list[dict[str, Any]]:
        """Current state of every process, for the status table."""
        rows: list[dict[str, Any]] = []
        if self.database is not None:
            alive = self.database.process is not None and self.database.process.poll() is None
            rows.append(
                {
                    "name": "postgres",
                    "pid": self.database.pid,
                    "address": f"{self.database.host}:{self.database.port}",
                    "state": "running" if alive else "down",
                    "restarts": 0,
                }
            )
        rows += [
            {
                "name": c.name,
                "pid": c.pid,
                "address": c.address,
                "state": c.state,
                "restarts": c.restarts,
            }
            for c in self.children
        ]
        return rows

    def pids(self) -> dict[str, int]:
        return {row["name"]: row["pid"] for row in self.rows() if row["pid"]}


def stop_stale_server(pgdata: Path, timeout: float = STOP_TIMEOUT) -> int | None:
    """Clear what an earlier ``up`` that died may have left in ``pgdata``: a stale
    ``postmaster.pid`` is removed; a server still running from it (an orphan: the caller holds
    the state directory's lock, so no live ``up`` owns it) is shut down. Returns its PID."""
    lock = pgdata / "postmaster.pid"
    try:
        first = lock.read_text(errors="replace").split("\n", 1)[0].strip()
    except OSError:
        return None
    pid = int(first) if first.isdigit() else 0
    if not pid or not _is_postgres_on(pid, pgdata):
        lock.unlink(missing_ok=True)
        return None
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGINT)  # fast shutdown
    deadline = time.monotonic() + timeout
    while _is_postgres_on(pid, pgdata):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + timeout
        time.sleep(0.05)
    lock.unlink(missing_ok=True)
    return pid


def _is_postgres_on(pid: int, pgdata: Path) -> bool:
    """Whether ``pid`` is a live postgres serving ``pgdata`` (not a recycled PID)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return (
        state != "Z"
        and bool(argv)
        and argv[0].endswith(b"postgres")
        and str(pgdata).encode() in argv
    )


def load_cache_secret(state_dir: Path, name: str = CACHE_SECRET_FILE) -> str:
    """The local mesh's cache secret (or another one, by file ``name``): read from
    ``state_dir``, or made once (random) and kept there, readable by the owner only. Without
    it every process would fall back to the per-database secret stored in the cache table,
    next to the entries it protects."""
    path = state_dir / name
    state_dir.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        os.chmod(path, 0o600)
        value = path.read_text(encoding="ascii").strip()
        if value:
            return value
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)  # empty (an interrupted first write): redo
    value = secrets.token_hex(32)
    with os.fdopen(fd, "w", encoding="ascii") as sink:
        sink.write(value + "\n")
    return value


async def _terminate(process: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after ``STOP_TIMEOUT``; returns once the process is gone."""
    if process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()


def _reasons(path: Path, most: int = 3) -> str:
    """The last FATAL/PANIC/ERROR lines of a PostgreSQL log (else its last line)."""
    text = _tail(path, 200)
    return _reasons_in(text, most) or "\n".join(text.splitlines()[-1:])


def _reasons_in(text: str, most: int = 3) -> str:
    """The last FATAL/PANIC/ERROR lines of PostgreSQL's output, or ``""``."""
    lines = text.strip().splitlines()
    found = [
        line for line in lines if any(f"{level}:" in line for level in ("FATAL", "PANIC", "ERROR"))
    ]
    return "\n".join(found[-most:] or lines[-1:])


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
