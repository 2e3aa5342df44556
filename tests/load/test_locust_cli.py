"""A short, bounded headless locust run of bench/locustfile.py against a real balancer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Processes

LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locustfile.py"
UNTIL_SEEN = Path(__file__).resolve().with_name("until_seen.py")


def test_headless_locust_run_reports_grpc_calls(dsn: str, procs: Processes, tmp_path: Path) -> None:
    replicas = [procs.hashd(dsn) for _ in range(2)]
    balancer = procs.balancer([r.address for r in replicas])
    procs.workerd(dsn)
    prefix = tmp_path / "locust"
    # locust (gevent) runs only as a subprocess: it monkeypatches the interpreter.
    run = subprocess.run(
        # Until every method looked for below has answered (until_seen.py); -t only caps it.
        # The JSON file is written once, at the end (the CSV files are refreshed every second).
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            f"{LOCUSTFILE},{UNTIL_SEEN}",
            "--headless",
            "-u",
            "4",
            "-r",
            "4",
            "-t",
            "60s",
            "--host",
            balancer.addresses["balancer"],
            "--json-file",
            str(prefix),
            "--only-summary",
            "--stop-timeout",
            "5",
            "--loglevel",
            "WARNING",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    entries = json.loads(Path(f"{prefix}.json").read_text())
    rows = {entry["name"]: entry for entry in entries}
    assert sum(entry["num_requests"] for entry in entries) > 0
    assert sum(entry["num_failures"] for entry in entries) == 0, entries
    names = set(rows)
    assert "/hashmesh.v1.HashService/ComputeHash" in names
    assert all(row["method"] == "grpc" for row in rows.values())
    # client-streaming and server-streaming calls are recorded too
    assert {"/hashmesh.v1.HashService/HashStream", "/hashmesh.v1.TaskService/WatchTask"} <= names, (
        names
    )
