"""hashd's Prometheus endpoint, scraped over HTTP from a real process after real calls: gRPC
calls by method and code, cache hits and misses per tier, tasks submitted, queue depth and the
database pool. Metric names come from hashmesh.core.metrics."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.scrape import eventually, scrape, value

SALTED = common_pb2.Argon2Params(
    time_cost=1, memory_cost_kib=8192, parallelism=1, salt=b"metrics-salt-16b"
)
HASH = {"grpc_service": "hashmesh.v1.HashService", "grpc_method": "Hash"}


def test_hashd_metrics_count_calls_cache_tasks_and_pool(procs: Processes, dsn: str) -> None:
    hashd = procs.hashd(
        dsn,
        "--metrics-port",
        "0",
        env={
            "HASHMESH_CACHE_SECRET": "metrics-secret",
            "HASHMESH_HASHD_QUEUE_METRICS_SECONDS": "0.2",
            "HASHMESH_DB_POOL_MAX": "5",
        },
    )
    # The gRPC address stays first (tests and `hashctl up` read it); the metrics line follows.
    assert list(hashd.addresses) == ["hashd", "hashd metrics"]
    metrics_address = hashd.addresses["hashd metrics"]
    assert metrics_address.startswith("127.0.0.1:")
    before = scrape(metrics_address)
    assert value(before, "hashmesh_grpc_server_handled_total", **HASH, grpc_code="OK") is None

    with grpc.insecure_channel(hashd.address) as channel:
        hasher = hash_pb2_grpc.HashServiceStub(channel)
        for data in (b"a", b"b", b"c"):
            hasher.Hash(
                hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=data), timeout=10
            )
        try:
            hasher.Hash(hash_pb2.HashRequest(data=b"no algorithm"), timeout=10)
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
        # argon2id with a salt is cached: computed (both tiers miss), then from memory.
        for _ in range(2):
            reply = hasher.Hash(
                hash_pb2.HashRequest(
                    algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"secret password", argon2=SALTED
                ),
                timeout=30,
            )
        assert reply.result.cached
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        spec = task_pb2.TaskSpec(
            algorithm=common_pb2.ALGORITHM_MD5, data=b"queued", idempotency_key="metrics-once"
        )
        for _ in range(2):  # the idempotent repeat is not a new submission
            tasks.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10)

    after = eventually(
        lambda: scrape(metrics_address),
        lambda s: value(s, "hashmesh_task_queue_depth", status="pending") == 1.0,
    )
    handled = "hashmesh_grpc_server_handled_total"
    assert value(after, handled, **HASH, grpc_code="OK") == 5.0
    assert value(after, handled, **HASH, grpc_code="INVALID_ARGUMENT") == 1.0
    assert value(after, "hashmesh_grpc_server_handling_seconds_count", **HASH) == 6.0
    assert value(after, "hashmesh_grpc_server_in_flight_calls", **HASH) == 0.0
    assert (
        value(
            after,
            handled,
            grpc_service="hashmesh.v1.TaskService",
            grpc_method="SubmitTask",
            grpc_code="OK",
        )
        == 2.0
    )
    assert (
        value(
            after,
            handled,
            grpc_service="grpc.health.v1.Health",
            grpc_method="Check",
            grpc_code="OK",
        )
        or 0
    ) >= 1.0

    assert value(after, "hashmesh_cache_misses_total", tier="memory") == 1.0
    assert value(after, "hashmesh_cache_misses_total", tier="shared") == 1.0
    assert value(after, "hashmesh_cache_hits_total", tier="memory") == 1.0
    assert value(after, "hashmesh_cache_hits_total", tier="shared") == 0.0

    assert value(after, "hashmesh_tasks_submitted_total", algorithm="md5") == 1.0
    assert value(after, "hashmesh_task_queue_depth", status="pending") == 1.0
    assert value(after, "hashmesh_task_queue_depth", status="succeeded") == 0.0

    assert value(after, "hashmesh_db_pool_max_connections", pool="hashd") == 5.0
    assert (value(after, "hashmesh_db_pool_connections", pool="hashd") or 0) >= 1.0
    requests = value(after, "hashmesh_db_pool_requests_total", pool="hashd") or 0
    assert requests > (value(before, "hashmesh_db_pool_requests_total", pool="hashd") or 0)
    assert value(after, "hashmesh_db_pool_request_errors_total", pool="hashd") == 0.0
    assert value(after, "hashmesh_hashd_cpu_queued_calls") == 0.0
    assert value(after, "hashmesh_hashd_cpu_refused_total") == 0.0
    # No label ever carries request data or a client's identity.
    assert not any(
        "secret" in v or "queued" in v or "metrics-once" in v
        for _, labels in after
        for _, v in labels
    )


def test_hashd_without_a_metrics_port_serves_no_endpoint(procs: Processes, dsn: str) -> None:
    hashd = procs.hashd(dsn)
    assert list(hashd.addresses) == ["hashd"]
    assert "metrics" not in hashd.log()
