"""``hashctl up`` dying badly: ``kill -9`` of the supervisor leaves no orphan, a second ``up``
on the same state directory is refused while the first lives and starts once it is gone, and
a PostgreSQL left running on the state directory by an earlier ``up`` is taken over."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from hashmesh.cli.client import ExitCode
from hashmesh.core.queue.embedded_pg import EmbeddedPostgres
from tests.e2e.test_cli_up import EventReader, _alive, _processes_mentioning


def _up(state_dir: Path) -> tuple[subprocess.Popen[str], EventReader]:
    env = {k: v for k, v in os.environ.items() if k != "HASHMESH_DATABASE_URL"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hashmesh.cli",
            "up",
            "--json",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--replicas",
            "1",
            "--workers",
            "1",
            "--state-dir",
            str(state_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    return process, EventReader(process)


def _descendants(roots: set[int]) -> set[int]:
    """``roots`` and every live process below them."""
    family = set(roots)
    while True:
        found = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid in family and int(entry.name) not in family:
                found.add(int(entry.name))
        if not found:
            return family
        family |= found


def _wait_gone(pids: set[int], timeout: float = 30.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


def _stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    return process.wait(60)


def test_kill_9_leaves_no_orphan_and_a_second_up_waits_its_turn(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    first, reader = _up(state_dir)
    try:
        ready = reader.wait_for(lambda e: e["event"] in ("ready", "failed"))
        assert ready["event"] == "ready", ready
        assert (state_dir / "logs" / "postgres.log").stat().st_size > 0  # with the others' logs
        assert (state_dir / "up.pid").read_text().strip() == str(first.pid)

        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "hashmesh.cli",
                "up",
                "--port",
                "0",
                "--admin-port",
                "0",
                "--state-dir",
                str(state_dir),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert second.returncode == ExitCode.FAILED_PRECONDITION, second.stderr
        assert second.stderr.strip().splitlines() == [
            f"error: hashctl up is already running on {state_dir} (PID {first.pid}); stop it first "
            "(Ctrl-C in its terminal, or kill that PID), or pass another --state-dir"
        ]

        mesh = _descendants(set(ready["pids"].values()))
        assert set(ready["pids"]) == {"postgres", "hashd-1", "balancer", "workerd-1"}
        os.kill(first.pid, signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        # The kernel tells every child (and the database) that the supervisor is gone.
        assert _wait_gone(mesh) == []
        assert _processes_mentioning(str(state_dir)) == []
    finally:
        _stop(first)

    again, reader = _up(state_dir)
    try:
        ready = reader.wait_for(lambda e: e["event"] in ("ready", "failed"))
        assert ready["event"] == "ready", ready
    finally:
        assert _stop(again) == 0
    assert _processes_mentioning(str(state_dir)) == []


def test_a_database_left_running_by_an_earlier_up_is_taken_over(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    # What an `up` that died before children died with it left behind: a server on the state
    # directory's data, parented by nobody we know.
    orphan = EmbeddedPostgres(data_dir=state_dir / "postgres")
    orphan.start()
    assert orphan.pid is not None and _alive(orphan.pid)
    up, reader = _up(state_dir)
    try:
        ready = reader.wait_for(lambda e: e["event"] in ("ready", "failed"))
        assert ready["event"] == "ready", ready
        taken_over = [e for e in reader.seen if e["event"] == "stopped" and e["name"] == "postgres"]
        assert taken_over and taken_over[0]["pid"] == orphan.pid, reader.seen
        assert orphan.process is not None and orphan.process.wait(10) is not None
        assert ready["pids"]["postgres"] != orphan.pid
    finally:
        assert _stop(up) == 0
        orphan.stop()
    assert _processes_mentioning(str(state_dir)) == []


def test_a_closed_terminal_stops_the_mesh_in_order(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    up, reader = _up(state_dir)
    try:
        ready = reader.wait_for(lambda e: e["event"] in ("ready", "failed"))
        assert ready["event"] == "ready", ready
        mesh = _descendants(set(ready["pids"].values()))
        up.send_signal(signal.SIGHUP)  # what a terminal sends its processes when it closes
        assert up.wait(60) == 0
    finally:
        _stop(up)
    reader.thread.join(5)
    while not reader.events.empty():
        reader.seen.append(reader.events.get())
    stops = [e["name"] for e in reader.seen if e["event"] == "stopped"]
    assert stops[0] == "balancer" and stops[-1] == "postgres"
    assert _wait_gone(mesh) == []


def test_a_database_that_cannot_start_is_explained_in_a_few_lines(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    broken = state_dir / "postgres" / "pgdata"
    broken.mkdir(parents=True)
    (broken / "PG_VERSION").write_text("15\n")  # looks initialised, has no configuration
    env = {k: v for k, v in os.environ.items() if k != "HASHMESH_DATABASE_URL"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "hashmesh.cli",
            "up",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--state-dir",
            str(state_dir),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert run.returncode == ExitCode.OTHER
    lines = run.stderr.strip().splitlines()
    assert (
        lines[0] == f"error: PostgreSQL did not start (log {state_dir / 'logs' / 'postgres.log'}):"
    )
    assert 2 <= len(lines) <= 4 and "postgresql.conf" in run.stderr, run.stderr
    assert _processes_mentioning(str(state_dir)) == []
