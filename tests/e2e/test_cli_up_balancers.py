"""``hashctl up --balancers 2``: two balancer processes on one public port, an admin
listener each, and the mesh answering through the shared port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.cli_helpers import hashctl
from tests.e2e.test_cli_up import EventReader


def test_up_runs_two_balancers_on_one_port(tmp_path: Path) -> None:
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
            "0",
            "--balancers",
            "2",
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
        first, second = running["balancer"]["addresses"], running["balancer-2"]["addresses"]
        assert first["balancer"] == second["balancer"]
        assert first["balancer admin"] != second["balancer admin"]
        assert running["balancer"]["pid"] != running["balancer-2"]["pid"]
        for _ in range(3):
            result = hashctl("--target", first["balancer"], "hash", "sha256", "hello")
            assert result.exit_code == 0, result.output
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    assert process.returncode == 0
