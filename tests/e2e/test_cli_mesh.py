"""Every hashctl command against a real mesh (3 hashd, the balancer, one workerd)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from hashmesh.cli.client import ExitCode
from hashmesh.cli.naming import STATUSES
from hashmesh.core.queue.embedded_pg import create_database
from tests.cli_helpers import hashctl, hashctl_json
from tests.conftest import Mesh, Processes

ADMIN_TOKEN = "cli-mesh-operator-token"
# hashctl acts as the operator here (cache clear, every client's tasks), and comes from
# 127.0.0.1, trusted as a proxy so that --client-id names the client (rate-limit overrides).
OPERATOR_ENV = {"HASHMESH_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def cli_mesh(
    pg_admin_dsn: str, pg_template: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    """The mesh fixture's shape, started once for this module."""
    name = f"hm_clim_{uuid.uuid4().hex[:10]}"
    dsn = create_database(pg_admin_dsn, name, template=pg_template)
    processes = Processes(log_dir=tmp_path_factory.mktemp("cli-mesh"))
    try:
        replicas = [processes.hashd(dsn, env=OPERATOR_ENV) for _ in range(3)]
        balancer = processes.balancer(
            [r.address for r in replicas],
            env={**OPERATOR_ENV, "HASHMESH_BALANCER_TRUSTED_PROXIES": "127.0.0.1"},
        )
        worker = processes.workerd(dsn)
        yield Mesh(dsn=dsn, hashd=replicas, balancer=balancer, workers=[worker])
    finally:
        processes.stop_all()
        with psycopg.connect(pg_admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def on(mesh: Mesh) -> list[str]:
    return [
        "--target",
        mesh.address,
        "--admin-target",
        mesh.admin_address,
        "--admin-token",
        ADMIN_TOKEN,
    ]


def test_hash_through_the_balancer(cli_mesh: Mesh) -> None:
    result = hashctl(*on(cli_mesh), "hash", "sha256", "hello")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == hashlib.sha256(b"hello").hexdigest()


def test_submit_wait_prints_the_workers_result(cli_mesh: Mesh) -> None:
    result = hashctl(*on(cli_mesh), "submit", "md5", "hello", "--wait", "--wait-timeout", "30")
    assert result.exit_code == 0, (result.stdout, result.stderr)
    assert result.stdout.strip() == hashlib.md5(b"hello").hexdigest()


def test_batch_submit_from_a_file(cli_mesh: Mesh, tmp_path: Path) -> None:
    inputs = [f"line {i}" for i in range(7)]
    path = tmp_path / "inputs.txt"
    path.write_text("\n".join(inputs) + "\n")
    tasks = hashctl_json(
        *on(cli_mesh),
        "--client-id",
        "batcher",
        "submit",
        "sha1",
        "--batch",
        str(path),
        "--chunk",
        "3",
        "--wait",
        "--wait-timeout",
        "30",
    )
    assert [t["result"]["encoded"] for t in tasks] == [
        hashlib.sha1(i.encode()).hexdigest() for i in inputs
    ]
    assert {t["status"] for t in tasks} == {"succeeded"}
    listed = hashctl_json(
        *on(cli_mesh), "task", "list", "--client", "batcher", "--all", "--limit", "2"
    )
    assert {t["id"] for t in listed["tasks"]} == {t["id"] for t in tasks}


def test_task_watch_streams_until_the_end(cli_mesh: Mesh) -> None:
    task = hashctl_json(*on(cli_mesh), "task", "submit", "sha256", "watch me")
    result = hashctl(*on(cli_mesh), "--json", "task", "watch", task["id"], "--wait-timeout", "30")
    assert result.exit_code == 0, result.stderr
    states = [json.loads(line) for line in result.stdout.splitlines()]
    assert states[-1]["status"] == "succeeded"
    assert states[-1]["result"]["encoded"] == hashlib.sha256(b"watch me").hexdigest()


def test_cancel_requeue_and_stats(cli_mesh: Mesh) -> None:
    task = hashctl_json(*on(cli_mesh), "submit", "md5", "later", "--delay", "3600")
    assert hashctl_json(*on(cli_mesh), "task", "cancel", task["id"])["status"] == "cancelled"
    again = hashctl(*on(cli_mesh), "task", "cancel", task["id"])
    assert again.exit_code == ExitCode.FAILED_PRECONDITION and "FAILED_PRECONDITION" in again.stderr
    assert hashctl_json(*on(cli_mesh), "task", "requeue", task["id"])["status"] == "pending"
    stats = hashctl_json(*on(cli_mesh), "task", "stats")
    assert set(stats["counts"]) == set(STATUSES) and sum(stats["counts"].values()) >= 1
    assert stats["workers_alive"] >= 1


def test_lb_commands(cli_mesh: Mesh) -> None:
    backends = hashctl_json(*on(cli_mesh), "lb", "backends")["backends"]
    assert sorted(b["address"] for b in backends) == sorted(r.address for r in cli_mesh.hashd)
    before = hashctl_json(*on(cli_mesh), "lb", "stats")["calls"]
    assert hashctl(*on(cli_mesh), "hash", "md5", "counted").exit_code == 0  # whatever ran before
    stats = hashctl_json(*on(cli_mesh), "lb", "stats")
    assert stats["calls"] >= before + 1 and len(stats["backends"]) == 3
    assert stats["budgets"]["upload_streams"] == {
        "in_use": 0,
        "total_limit": 1024,
        "peer_limit": 64,
    }
    assert stats["top_holding_peers"] == [] and stats["over_budget"] == 0
    table = hashctl(*on(cli_mesh), "lb", "stats").output
    assert "request_bytes" in table and "TOTAL LIMIT" in table
    assert (
        hashctl_json(*on(cli_mesh), "lb", "strategy", "least_connections")["strategy"]
        == "least_connections"
    )
    assert hashctl_json(*on(cli_mesh), "lb", "strategy")["strategy"] == "least_connections"
    hashctl_json(*on(cli_mesh), "lb", "strategy", "round_robin")
    bad = hashctl(*on(cli_mesh), "lb", "strategy", "random")
    assert bad.exit_code == ExitCode.INVALID_ARGUMENT
    first = cli_mesh.hashd[0].address
    assert hashctl_json(*on(cli_mesh), "lb", "drain", first)["state"] == "draining"
    assert hashctl_json(*on(cli_mesh), "lb", "drain", first, "--undrain")["state"] != "draining"
    unknown = hashctl(*on(cli_mesh), "lb", "drain", "127.0.0.1:1")
    assert unknown.exit_code == ExitCode.NOT_FOUND


def test_rate_limited_exit_code_and_retry_after(cli_mesh: Mesh) -> None:
    limits = hashctl_json(
        *on(cli_mesh), "ratelimit", "set", "--client", "greedy", "--rate", "0.01", "--burst", "1"
    )
    assert {"client_id": "greedy", "rate_per_second": 0.01, "burst": 1} in limits["overrides"]
    try:
        codes = [
            hashctl(*on(cli_mesh), "--client-id", "greedy", "hash", "md5", "x") for _ in range(3)
        ]
        refused = [r for r in codes if r.exit_code != 0]
        assert refused, "the limiter let every call through"
        assert refused[0].exit_code == ExitCode.RATE_LIMITED
        assert refused[0].stderr.startswith("error: RESOURCE_EXHAUSTED")
        assert "retry after" in refused[0].stderr
    finally:
        hashctl_json(*on(cli_mesh), "ratelimit", "set", "--remove", "greedy")
    current = hashctl_json(*on(cli_mesh), "ratelimit", "get")
    assert all(o["client_id"] != "greedy" for o in current["overrides"])


def test_cache_and_health(cli_mesh: Mesh) -> None:
    stats = hashctl_json(*on(cli_mesh), "cache", "stats")
    assert {t["tier"] for t in stats["tiers"]} >= {"memory"}
    cleared = hashctl_json(*on(cli_mesh), "cache", "clear", "--yes")
    assert "shared_entries_removed" in cleared
    assert hashctl_json(*on(cli_mesh), "health")["status"] == "SERVING"
    assert hashctl_json(*on(cli_mesh), "health", "--admin")["status"] == "SERVING"


def test_cache_stats_add_up_every_replica(cli_mesh: Mesh) -> None:
    import grpc

    from hashmesh.v1 import cache_pb2, cache_pb2_grpc, common_pb2, hash_pb2, hash_pb2_grpc

    # Two identical calls straight to the last replica: a hit there, wherever stats land.
    request = hash_pb2.HashRequest(
        algorithm=common_pb2.ALGORITHM_ARGON2ID,
        data=b"stats-pw",
        argon2=(
            common_pb2.Argon2Params(
                time_cost=1, memory_cost_kib=8192, parallelism=1, salt=b"stats-salt-16byt"
            )
        ),
    )
    with grpc.insecure_channel(cli_mesh.hashd[-1].address) as channel:
        for _ in range(2):
            hash_pb2_grpc.HashServiceStub(channel).Hash(request, timeout=30)
    own = []
    for replica in cli_mesh.hashd:
        with grpc.insecure_channel(replica.address) as channel:
            own.append(
                cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(
                    cache_pb2.GetCacheStatsRequest(), timeout=10
                )
            )
    stats = hashctl_json(*on(cli_mesh), "cache", "stats")
    assert stats["scope"] == "mesh" and sorted(stats["replicas"]) == sorted(
        r.address for r in cli_mesh.hashd
    )
    memory = next(t for t in stats["tiers"] if t["tier"] == "memory")
    assert memory["hits"] == sum(
        t.hits for r in own for t in r.tiers if t.tier == cache_pb2.CACHE_TIER_MEMORY
    )
    assert memory["hits"] >= 1
    # No balancer to list the replicas: the one that answered, and the output says so.
    alone = hashctl_json(
        "--target", cli_mesh.address, "--admin-target", "127.0.0.1:1", "cache", "stats"
    )
    assert alone["scope"] == "one replica" and len(alone["replicas"]) == 1
    text = hashctl("--target", cli_mesh.address, "--admin-target", "127.0.0.1:1", "cache", "stats")
    assert "this replica only" in text.stdout


def _hashctl_process(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hashmesh.cli", *args],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )


def test_bench_json_is_a_ghz_report(cli_mesh: Mesh) -> None:
    data = '{"algorithm": "ALGORITHM_SHA256", "data": "aGVsbG8="}'
    run = _hashctl_process(
        "bench",
        "--call",
        "hashmesh.v1.HashService.Hash",
        "-d",
        data,
        "-n",
        "300",
        "-c",
        "8",
        "--procs",
        "2",
        "-O",
        "json",
        cli_mesh.address,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["count"] == 300 and report["statusCodeDistribution"] == {"OK": 300}
    assert (
        isinstance(report["total"], int)
        and report["fastest"] <= report["average"] <= report["slowest"]
    )
    assert [p["percentage"] for p in report["latencyDistribution"]] == [10, 25, 50, 75, 90, 95, 99]
    assert sum(b["count"] for b in report["histogram"]) == 300
    assert report["options"]["data"] == json.loads(data) and report["options"]["call"].endswith(
        "Hash"
    )
    assert len(report["details"]) == 300 and report["endReason"] == "normal"


def test_bench_never_echoes_argon2_input(cli_mesh: Mesh) -> None:
    secret = "c3VwZXItc2VjcmV0"  # base64 of the password
    data = (
        f'{{"algorithm": "ALGORITHM_ARGON2ID", "data": "{secret}", "argon2": {{"time_cost": 1, '
        '"memory_cost_kib": 8192, "parallelism": 1}}'
    )
    for fmt in ("json", "summary"):
        run = _hashctl_process(
            "bench", "-d", data, "-n", "4", "-c", "2", "-O", fmt, cli_mesh.address
        )
        assert run.returncode == 0, run.stderr
        assert secret not in run.stdout and "super-secret" not in run.stdout
    assert (
        "data"
        not in json.loads(
            _hashctl_process(
                "bench", "-d", data, "-n", "2", "-c", "1", "-O", "json", cli_mesh.address
            ).stdout
        )["options"]
    )


def test_bench_duration_rate_and_csv(cli_mesh: Mesh) -> None:
    data = '{"algorithm": "ALGORITHM_MD5", "data": "eA=="}'
    result = hashctl(
        "--client-id",
        "bencher",
        "bench",
        "-d",
        data,
        "-z",
        "1s",
        "--rps",
        "40",
        "-c",
        "4",
        "-O",
        "json",
        cli_mesh.address,
    )
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["endReason"] == "timeout" and report["count"] > 0
    assert report["options"]["duration"] == 1_000_000_000 and report["options"]["qps"] == 40
    assert report["options"]["metadata"] == {"x-client-id": "bencher"}
    csv_run = hashctl("bench", "-d", data, "-n", "5", "-c", "1", "-O", "csv", cli_mesh.address)
    lines = csv_run.stdout.splitlines()
    assert lines[0] == "duration (ms),status,error" and len(lines) == 6
    assert all(line.split(",")[1] == "OK" for line in lines[1:])


def test_bench_counts_failures_by_status(cli_mesh: Mesh) -> None:
    result = hashctl(
        "bench", "-d", '{"data": "eA=="}', "-n", "6", "-c", "2", "-O", "json", cli_mesh.address
    )
    # Every call failed: the report is still printed, and the exit code says so.
    assert result.exit_code == ExitCode.INVALID_ARGUMENT, result.stderr
    assert result.stderr.startswith("error: every call failed: rpc error: code = InvalidArgument")
    report = json.loads(result.stdout)
    assert report["statusCodeDistribution"] == {"InvalidArgument": 6}
    [(error, count)] = report["errorDistribution"].items()
    assert error.startswith("rpc error: code = InvalidArgument desc = ") and count == 6


def test_submit_wait_with_a_key_twice_is_one_task(cli_mesh: Mesh) -> None:
    """``submit --wait`` is one SubmitAndWatchTask call; a key replays the first task."""
    key = f"cli-{uuid.uuid4().hex[:8]}"
    args = ("submit", "sha256", "once", "--idempotency-key", key, "--wait", "--wait-timeout", "30")
    first = hashctl_json(*on(cli_mesh), *args)
    again = hashctl_json(*on(cli_mesh), *args)
    assert first["status"] == again["status"] == "succeeded" and first["id"] == again["id"]
    assert again["result"]["encoded"] == hashlib.sha256(b"once").hexdigest()
