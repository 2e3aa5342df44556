"""``hashctl up`` as a new user runs it: embedded PostgreSQL, the mesh, the demo; a crashed
child comes back; SIGTERM leaves no process of the mesh behind."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.cli_helpers import hashctl


class EventReader:
    """Reads ``hashctl up --json`` events from its stdout on a thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self.thread.start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))
        process.stdout.close()

    def wait_for(self, predicate: Any, timeout: float = 90.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"event not seen; got {self.seen[-10:]}"
            try:
                event = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(event)
            if predicate(event):
                return event


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _environ(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"
                ):
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_up_demo_restart_and_clean_stop(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
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
            "2",
            "--workers",
            "1",
            "--state-dir",
            str(state_dir),
            "--demo",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    reader = EventReader(process)
    try:
        ready = reader.wait_for(lambda e: e["event"] in ("ready", "failed"))
        assert ready["event"] == "ready", ready
        pids: dict[str, int] = ready["pids"]
        assert set(pids) == {"postgres", "hashd-1", "hashd-2", "balancer", "workerd-1"}
        assert (state_dir / "postgres").is_dir() and (state_dir / "logs" / "hashd-1.log").exists()
        # One random cache secret, kept 0600 in the state directory, given to hashd and workerd.
        secret_file = state_dir / "cache-secret"
        assert secret_file.stat().st_mode & 0o777 == 0o600
        secret = secret_file.read_text().strip()
        assert len(secret) == 64
        for name in ("hashd-1", "hashd-2", "workerd-1"):
            assert f"HASHMESH_CACHE_SECRET={secret}".encode() in _environ(pids[name])
        assert b"HASHMESH_CACHE_SECRET=" not in _environ(pids["balancer"])
        done = reader.wait_for(lambda e: e["event"] == "demo_done")
        demo = [e for e in reader.seen if e["event"] == "demo"]
        assert done["ok"] is True, demo
        assert any(hashlib.sha256(b"hello").hexdigest() in e["message"] for e in demo)

        target = ready["target"]
        result = hashctl("--target", target, "hash", "sha256", "hello")
        assert result.stdout.strip() == hashlib.sha256(b"hello").hexdigest()

        os.kill(pids["hashd-1"], signal.SIGKILL)
        back = reader.wait_for(lambda e: e["event"] == "running" and e["name"] == "hashd-1")
        assert back["restarts"] == 1 and back["pid"] != pids["hashd-1"]
        all_pids = [*pids.values(), back["pid"]]
        # the balancer still reaches the restarted replica: same address across restarts
        for _ in range(4):
            assert hashctl("--target", target, "hash", "md5", "x").exit_code == 0
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    reader.thread.join(5)
    while not reader.events.empty():
        reader.seen.append(reader.events.get())
    assert code == 0
    stops = [e["name"] for e in reader.seen if e["event"] == "stopped"]
    assert stops[0] == "balancer" and stops[-1] == "postgres"
    assert stops.index("workerd-1") < stops.index("hashd-1")
    assert [pid for pid in all_pids if _alive(pid)] == []
    assert _processes_mentioning(str(state_dir)) == []
    assert _processes_mentioning(ready["dsn"]) == []


def test_sigterm_during_start_up_leaves_nothing_behind(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
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
            "2",
            "--state-dir",
            str(state_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
        start_new_session=True,
    )
    reader = EventReader(process)
    try:
        database = reader.wait_for(lambda e: e["event"] == "running" and e["name"] == "postgres")
        reader.wait_for(lambda e: e["event"] == "starting" and e["name"] == "hashd-2")
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    reader.thread.join(5)
    assert code == 0
    assert not _alive(database["pid"])
    assert _processes_mentioning(str(state_dir)) == []
    assert _processes_mentioning(database["dsn"]) == []


def test_a_child_that_cannot_start_fails_up_cleanly(dsn: str, tmp_path: Path) -> None:
    """An existing database (--database-url), and a balancer whose settings are wrong."""
    env = {**os.environ, "HASHMESH_BALANCER_RATE_LIMIT": "not-a-rate"}
    run = subprocess.run(
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
            "--database-url",
            dsn,
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=90,
    )
    assert run.returncode == 1
    events = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    failed = [e for e in events if e["event"] == "failed"]
    assert failed and failed[0]["error"].startswith("balancer did not start")
    assert "not-a-rate" in run.stderr and "Traceback" not in run.stderr
    assert events[-1]["event"] == "down"
    assert not any(e["name"] == "postgres" for e in events if "name" in e)  # no embedded database
    assert _processes_mentioning(dsn) == []


def test_up_with_bad_port_or_unreachable_database_exits_with_its_code(tmp_path: Path) -> None:
    def up(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "hashmesh.cli",
                "up",
                "--json",
                "--state-dir",
                str(tmp_path / "state"),
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )

    bad_port = up("--port", "99999", "--admin-port", "0")
    assert bad_port.returncode == 2 and "Traceback" not in bad_port.stderr, bad_port.stderr
    assert "--port" in bad_port.stderr
    unreachable = up(
        "--port", "0", "--admin-port", "0", "--database-url", "postgresql://nobody@127.0.0.1:1/none"
    )
    assert unreachable.returncode == 3, unreachable.stderr
    assert "Traceback" not in unreachable.stderr and "mesh did not start" in unreachable.stderr


def test_up_with_metrics_serves_prometheus_from_every_process(tmp_path: Path) -> None:
    from tests.scrape import scrape

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
            "--metrics",
            "--state-dir",
            str(tmp_path / "state"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    reader = EventReader(process)
    try:
        reader.wait_for(lambda e: e.get("event") == "ready")
        running = {
            e["name"]: e for e in reader.seen if e.get("event") == "running" and "addresses" in e
        }
        for name, kind in (
            ("hashd-1", "hashd"),
            ("balancer", "balancer"),
            ("workerd-1", "workerd"),
        ):
            address = running[name]["addresses"][f"{kind} metrics"]
            names = {sample_name for sample_name, _ in scrape(address)}
            assert "hashmesh_build_info" in names, (name, sorted(names)[:5])
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0
