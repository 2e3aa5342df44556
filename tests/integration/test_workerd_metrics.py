"""workerd's Prometheus endpoint, scraped over HTTP from a real process after it ran real tasks
from a real PostgreSQL: claims, successes, failed attempts and dead letters per algorithm,
submit→final latency, the in-flight gauge and the database pool. Plus the settings, and the
deploy files that must bind the endpoint where the probes reach it."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import grpc
import psycopg
import pytest
import yaml

from hashmesh.core.settings import SettingsError
from hashmesh.v1 import common_pb2, task_pb2, task_pb2_grpc
from hashmesh.workerd.config import WorkerSettings
from tests.conftest import Processes
from tests.procs import Proc
from tests.scrape import scrape, value

ROOT = Path(__file__).resolve().parents[2]


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        time.sleep(0.05)


def counts(dsn: str) -> dict[str, int]:
    with psycopg.connect(dsn) as conn:
        return dict(
            conn.execute("SELECT status, count(*) FROM hashmesh_tasks GROUP BY 1").fetchall()
        )


def metrics_address(worker: Proc) -> str:
    # The ready line is the start marker; the metrics line follows it.
    wait_until(lambda: "workerd metrics" in worker.addresses, 10, "the metrics line")
    return worker.addresses["workerd metrics"]


def test_workerd_metrics_count_claims_outcomes_latency_and_pool(procs: Processes, dsn: str) -> None:
    hashd = procs.hashd(dsn)
    worker = procs.workerd(
        dsn,
        "--name",
        "metered",
        "--metrics-port",
        "0",
        env={
            "HASHMESH_WORKERD_FAIL_ALGORITHMS": "sha1",
            "HASHMESH_TASK_RETRY_BASE": "0.2",
            "HASHMESH_WORKERD_POLL_SECONDS": "0.5",
            "HASHMESH_DB_POOL_MAX": "3",
        },
    )
    address = metrics_address(worker)
    assert address.startswith("127.0.0.1:")  # local unless HASHMESH_WORKERD_METRICS_HOST says
    lines = worker.log().splitlines()
    assert lines.index("workerd ready as metered") < lines.index(
        f"workerd metrics listening on {address}"
    )
    before = scrape(address)
    # Bound per algorithm at start: exported at 0 before any task.
    assert value(before, "hashmesh_tasks_claimed_total", algorithm="md5") == 0.0
    assert value(before, "hashmesh_tasks_dead_lettered_total", algorithm="sha1") == 0.0
    assert value(before, "hashmesh_worker_in_flight_tasks") == 0.0

    specs = [
        *(
            task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"md5-%d" % i)
            for i in range(3)
        ),
        task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA256, data=b"sha256-secret"),
        # Fails on every attempt (fault injection): two attempts, then DEAD_LETTER.
        task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA1, data=b"doomed", max_attempts=2),
    ]
    submitted = time.monotonic()
    with grpc.insecure_channel(hashd.address) as channel:
        reply = task_pb2_grpc.TaskServiceStub(channel).SubmitTasks(
            task_pb2.SubmitTasksRequest(specs=specs), timeout=10
        )
    ids = [t.id for t in reply.tasks]
    wait_until(lambda: counts(dsn) == {"succeeded": 4, "dead_letter": 1}, 30, "all tasks final")
    elapsed = time.monotonic() - submitted

    def recorded() -> bool:
        samples = scrape(address)
        return value(samples, "hashmesh_tasks_dead_lettered_total", algorithm="sha1") == 1.0 and (
            value(samples, "hashmesh_tasks_succeeded_total", algorithm="md5") == 3.0
        )

    wait_until(recorded, 10, "outcomes recorded after their write")
    after = scrape(address)

    expected = {
        # name: {algorithm: count}; the sha1 task was claimed once per attempt.
        "hashmesh_tasks_claimed_total": {"md5": 3, "sha256": 1, "sha1": 2, "argon2id": 0},
        "hashmesh_tasks_succeeded_total": {"md5": 3, "sha256": 1, "sha1": 0},
        "hashmesh_tasks_failed_total": {"md5": 0, "sha256": 0, "sha1": 2},
        "hashmesh_tasks_dead_lettered_total": {"md5": 0, "sha256": 0, "sha1": 1},
    }
    for name, per_algorithm in expected.items():
        for algorithm, count in per_algorithm.items():
            assert value(after, name, algorithm=algorithm) == count, (name, algorithm)

    latency = "hashmesh_task_latency_seconds"
    assert value(after, f"{latency}_count", algorithm="md5", status="succeeded") == 3.0
    assert value(after, f"{latency}_count", algorithm="sha256", status="succeeded") == 1.0
    assert value(after, f"{latency}_count", algorithm="sha1", status="dead_letter") == 1.0
    assert value(after, f"{latency}_count", algorithm="sha1", status="succeeded") == 0.0
    assert value(after, f"{latency}_count", algorithm="md5", status="dead_letter") == 0.0
    # Database timestamps (created_at → finished_at): the dead letter waited at least half the
    # 0.2 s backoff before its second attempt, and nothing took longer than the test watched.
    dead_letter_seconds = value(after, f"{latency}_sum", algorithm="sha1", status="dead_letter")
    assert dead_letter_seconds is not None and 0.1 <= dead_letter_seconds <= elapsed + 1.0
    md5_seconds = value(after, f"{latency}_sum", algorithm="md5", status="succeeded")
    assert md5_seconds is not None and 0.0 < md5_seconds <= 3 * (elapsed + 1.0)

    assert value(after, "hashmesh_worker_in_flight_tasks") == 0.0
    pool = "workerd:metered"
    assert value(after, "hashmesh_db_pool_max_connections", pool=pool) == 3.0
    assert (value(after, "hashmesh_db_pool_connections", pool=pool) or 0) >= 1.0
    assert (value(after, "hashmesh_db_pool_requests_total", pool=pool) or 0) > (
        value(before, "hashmesh_db_pool_requests_total", pool=pool) or 0
    )
    assert value(after, "hashmesh_db_pool_request_errors_total", pool=pool) == 0.0
    # Bounded labels: never a task id or request data.
    label_values = {v for _, labels in after for _, v in labels}
    assert not label_values & set(ids)
    assert not any("secret" in v or "doomed" in v or "md5-" in v for v in label_values)
    assert worker.terminate() == 0


def test_metrics_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HASHMESH_WORKERD_METRICS_PORT", raising=False)
    monkeypatch.delenv("HASHMESH_WORKERD_METRICS_HOST", raising=False)
    off = WorkerSettings.from_env()
    assert off.metrics_port is None and off.metrics_host == "127.0.0.1"
    monkeypatch.setenv("HASHMESH_WORKERD_METRICS_PORT", "9100")
    monkeypatch.setenv("HASHMESH_WORKERD_METRICS_HOST", "0.0.0.0")
    on = WorkerSettings.from_env()
    assert (on.metrics_port, on.metrics_host) == (9100, "0.0.0.0")
    assert on.with_overrides(metrics_port=0, metrics_host=None).metrics_port == 0
    with pytest.raises(SettingsError, match="METRICS_PORT"):
        on.with_overrides(metrics_port=70000)
    monkeypatch.setenv("HASHMESH_WORKERD_METRICS_PORT", "-1")
    with pytest.raises(SettingsError, match="METRICS_PORT"):
        WorkerSettings.from_env()


def test_deploy_binds_workerd_metrics_where_the_probes_reach_them() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    env = compose["services"]["workerd"]["environment"]
    assert env["HASHMESH_WORKERD_METRICS_HOST"] == "0.0.0.0"
    # The image's role-aware probe: for workerd it fetches the metrics on the port this very
    # environment gives (tests/unit/test_deploy_healthcheck_roles.py runs it against a server).
    assert compose["services"]["workerd"]["healthcheck"]["test"] == ["CMD", "hashmesh-healthcheck"]
    assert env["HASHMESH_WORKERD_METRICS_PORT"] == "9100"

    config = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy/k8s/config.yaml").read_text())
        if doc["kind"] == "ConfigMap"
    )["data"]
    assert config["HASHMESH_WORKERD_METRICS_HOST"] == "0.0.0.0"
    deployment = next(
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy/k8s/workerd.yaml").read_text())
        if doc["kind"] == "Deployment"
    )
    pod = deployment["spec"]["template"]
    [container] = pod["spec"]["containers"]
    [port] = [p for p in container["ports"] if p["name"] == "metrics"]
    assert str(port["containerPort"]) == config["HASHMESH_WORKERD_METRICS_PORT"]
    assert (
        pod["metadata"]["annotations"]["prometheus.io/port"]
        == config["HASHMESH_WORKERD_METRICS_PORT"]
    )
    for probe_name in ("readinessProbe", "livenessProbe"):
        assert container[probe_name]["httpGet"] == {"path": "/metrics", "port": "metrics"}
