"""A short, bounded headless locust run of bench/locustfile.py against a real balancer."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Processes

LOCUSTFILE = Path(__file__).resolve().parents[2] / "bench" / "locustfile.py"


def test_headless_locust_run_reports_grpc_calls(dsn: str, procs: Processes, tmp_path: Path) -> None:
    replicas = [procs.hashd(dsn) for _ in range(2)]
    balancer = procs.balancer([r.address for r in replicas])
    procs.workerd(dsn)
    prefix = tmp_path / "locust"
    # locust (gevent) runs only as a subprocess: it monkeypatches the interpreter.
    run = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "4", "-r", "4", "-t", "4s",
         "--host", balancer.addresses["balancer"], "--csv", str(prefix), "--only-summary", "--stop-timeout", "5",
         "--loglevel", "WARNING"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("PYTEST")},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows.pop("Aggregated")
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()
    names = set(rows)
    assert "/hashmesh.v1.HashService/ComputeHash" in names
    assert all(row["Type"] == "grpc" for row in rows.values())
    # client-streaming and server-streaming calls are recorded too
    assert {"/hashmesh.v1.HashService/HashStream", "/hashmesh.v1.TaskService/WatchTask"} <= names, names
