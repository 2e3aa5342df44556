"""The test bed: a real PostgreSQL (``HASHMESH_TEST_DSN``, or an embedded server started once
per session), a clean database per test cloned from a migrated template, and factories that
start real hashd / workerd / balancer processes on free loopback ports and stop them by PID."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

from hashmesh.core.queue import migrations
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres, create_database
from hashmesh.core.queue.sealing import KEY_FILE_ENV, ensure_key_file
from tests.procs import Proc, start_process, wait_serving

TEMPLATE_DB = "hashmesh_test_template"
_OWN_BASETEMP = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    """Give this run a temporary root of its own. pytest's default, /tmp/pytest-of-USER,
    keeps only the last 3 runs of that user: a second run on the machine (another terminal,
    another checkout) deletes the first one's directories, its embedded PostgreSQL included."""
    if config.option.basetemp is None and not hasattr(config, "workerinput"):
        config.option.basetemp = tempfile.mkdtemp(prefix="hashmesh-tests-")
        config.stash[_OWN_BASETEMP] = config.option.basetemp


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A green run leaves nothing in /tmp; a red one keeps its logs for a look."""
    own = session.config.stash.get(_OWN_BASETEMP, None)
    if own is not None and exitstatus == 0:
        shutil.rmtree(own, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def task_key_file(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Every process a test starts seals task inputs with one key ring, as a mesh would (a
    test that wants none sets ``HASHMESH_TASK_KEY_FILE`` to an empty value)."""
    path = ensure_key_file(tmp_path_factory.mktemp("task-keys") / "task-keys")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(KEY_FILE_ENV, str(path))
        yield path


@pytest.fixture(scope="session")
def pg_admin_dsn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """DSN of a server where tests may create databases."""
    configured = os.environ.get("HASHMESH_TEST_DSN")
    if configured:
        yield configured
        return
    server = EmbeddedPostgres(data_dir=tmp_path_factory.mktemp("embedded-pg"))
    server.start()
    try:
        yield server.dsn
    finally:
        server.stop()


@pytest.fixture(scope="session")
def pg_template(pg_admin_dsn: str) -> str:
    """A database with every migration applied, copied for each test."""
    template_dsn = create_database(pg_admin_dsn, f"{TEMPLATE_DB}_{os.getpid()}")
    migrations.migrate(template_dsn)
    return template_dsn.rsplit("/", 1)[1].split("?")[0]


@pytest.fixture
def dsn(pg_admin_dsn: str, pg_template: str) -> Iterator[str]:
    """A fresh, migrated database for this test alone; dropped afterwards."""
    name = f"hm_{uuid.uuid4().hex[:12]}"
    test_dsn = create_database(pg_admin_dsn, name, template=pg_template)
    yield test_dsn
    with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def owned_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server this test owns (to stop, kill or restart); migrated."""
    server = EmbeddedPostgres(data_dir=tmp_path / "owned-pg")
    server.start()
    migrations.migrate(server.dsn)
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Processes:
    """Starts daemons for one test and stops every one of them, by PID, at teardown."""

    log_dir: Path
    started: list[Proc] = field(default_factory=list)

    def _start(
        self, name: str, argv: list[str], env: dict[str, str] | None, expect: tuple[str, ...]
    ) -> Proc:
        proc = start_process(name, argv, log_dir=self.log_dir, env=env, expect=expect)
        self.started.append(proc)
        return proc

    # The DSN travels in the environment: it holds the password, and argv is public.
    def hashd(self, dsn: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = self._start(
            "hashd",
            ["hashmesh.hashd", "--listen", "127.0.0.1:0", *args],
            {"HASHMESH_DATABASE_URL": dsn, **(env or {})},
            ("hashd",),
        )
        wait_serving(proc.address)
        return proc

    def workerd(self, dsn: str, *args: str, env: dict[str, str] | None = None) -> Proc:
        return self._start(
            "workerd",
            ["hashmesh.workerd", *args],
            {"HASHMESH_DATABASE_URL": dsn, **(env or {})},
            ("workerd",),
        )

    def balancer(self, backends: list[str], *args: str, env: dict[str, str] | None = None) -> Proc:
        proc = self._start(
            "balancer",
            [
                "hashmesh.balancer",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--backends",
                ",".join(backends),
                *args,
            ],
            # Two slow health answers in a row on a loaded machine must not take a live replica
            # out of rotation; a dead one still fails its check at once.
            {"HASHMESH_BALANCER_HEALTH_TIMEOUT": "5", **(env or {})},
            ("balancer", "balancer admin"),
        )
        wait_serving(proc.addresses["balancer"])
        return proc

    def stop_all(self) -> None:
        # Front first, database users after: the order `hashctl up` uses too.
        order = {"balancer": 0, "workerd": 1, "hashd": 2}
        for proc in sorted(self.started, key=lambda p: order.get(p.name, 3)):
            proc.terminate()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(log_dir=tmp_path)
    try:
        yield processes
    finally:
        processes.stop_all()


@dataclass
class Mesh:
    dsn: str
    hashd: list[Proc]
    balancer: Proc
    workers: list[Proc]

    @property
    def address(self) -> str:
        return self.balancer.addresses["balancer"]

    @property
    def admin_address(self) -> str:
        return self.balancer.addresses["balancer admin"]


@pytest.fixture
def mesh(dsn: str, procs: Processes) -> Mesh:
    """3 hashd replicas, the balancer in front, one workerd: the whole path on loopback."""
    replicas = [procs.hashd(dsn) for _ in range(3)]
    balancer = procs.balancer([r.address for r in replicas])
    worker = procs.workerd(dsn)
    return Mesh(dsn=dsn, hashd=replicas, balancer=balancer, workers=[worker])
