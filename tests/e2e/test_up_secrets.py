"""``hashctl up`` keeps its secrets: a task key file (0600) for hashd and workerd only, the
database password out of every event, command line and log; an argon2 task still runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from hashmesh.core.hashing import argon2id_verify
from hashmesh.core.sealing import KEY_FILE_ENV, KEYS_ENV
from tests.cli_helpers import hashctl
from tests.e2e.test_cli_up import EventReader, _environ, _processes_mentioning


def test_up_seals_task_inputs_and_keeps_the_database_password_secret(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    unset = {"HASHMESH_DATABASE_URL", KEY_FILE_ENV, KEYS_ENV}
    env = {k: v for k, v in os.environ.items() if k not in unset}
    process = subprocess.Popen(
        [sys.executable, "-m", "hashmesh.cli", "up", "--json", "--port", "0", "--admin-port", "0",
         "--replicas", "1", "--workers", "1", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    reader = EventReader(process)
    try:
        ready = reader.wait_for(lambda e: e["event"] in ("ready", "failed"))
        assert ready["event"] == "ready", ready
        pids: dict[str, int] = ready["pids"]
        key_file = state_dir / "task-keys"
        assert key_file.stat().st_mode & 0o777 == 0o600
        for name in ("hashd-1", "workerd-1"):
            assert f"{KEY_FILE_ENV}={key_file}".encode() in _environ(pids[name])
        assert f"{KEY_FILE_ENV}=".encode() not in b"\0".join(_environ(pids["balancer"]))

        password = (state_dir / "postgres" / "password").read_text().strip()
        assert len(password) >= 32
        assert "***" in ready["dsn"] and password not in ready["dsn"]
        assert _processes_mentioning(password) == []  # not on any command line

        secret = b"up-argon2-secret-7f3a"
        submitted = hashctl("--target", ready["target"], "submit", "argon2id", "-", "--salt",
                            "saltsalt", "--wait", "--wait-timeout", "60", input=secret)  # fmt: skip
        assert submitted.exit_code == 0, submitted.stderr
        assert argon2id_verify(submitted.stdout.strip(), secret)[0], submitted.stdout
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(60)
    reader.thread.join(5)
    while not reader.events.empty():
        reader.seen.append(reader.events.get())
    assert code == 0
    shown = repr(reader.seen)
    assert password not in shown and secret.decode() not in shown
    for log in (state_dir / "logs").iterdir():
        text = log.read_text(errors="replace")
        assert password not in text and secret.decode() not in text, log
