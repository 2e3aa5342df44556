"""The balancer in front of real hashd replicas: failover under load, reflection, health."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from hashmesh.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hash_pb2, hash_pb2_grpc
from tests.conftest import Processes

FAST_HEALTH = {"HASHMESH_BALANCER_HEALTH_INTERVAL": "0.2"}


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"not reached within {timeout}s: {what}"
        time.sleep(0.02)


def test_killing_two_of_three_replicas_under_load_fails_no_call(dsn: str, procs: Processes) -> None:
    replicas = [procs.hashd(dsn) for _ in range(3)]
    balancer = procs.balancer([r.address for r in replicas], env=FAST_HEALTH)
    outcomes: list[str] = []
    failures: list[grpc.RpcError] = []
    stop = threading.Event()

    def steady_load() -> None:
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            hashes = hash_pb2_grpc.HashServiceStub(channel)
            while not stop.is_set():
                try:
                    hashes.Hash(
                        hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"steady"),
                        timeout=10,
                    )  # type: ignore[arg-type]
                    outcomes.append("ok")
                except grpc.RpcError as err:
                    failures.append(err)
                time.sleep(0.005)

    workers = [threading.Thread(target=steady_load) for _ in range(4)]
    for worker in workers:
        worker.start()
    admin_channel = grpc.insecure_channel(balancer.addresses["balancer admin"])
    admin = admin_pb2_grpc.AdminServiceStub(admin_channel)

    def states() -> dict[str, int]:
        listed = admin.ListBackends(admin_pb2.ListBackendsRequest(), timeout=5)
        return {b.address: b.state for b in listed.backends}

    # Each step waits for calls to have gone through (the load is running), not for time.
    try:
        wait_until(lambda: len(outcomes) >= 50, "load through three replicas")
        replicas[0].kill()
        seen = len(outcomes)
        wait_until(lambda: len(outcomes) >= seen + 50, "load after the first kill")
        replicas[1].kill()
        before_last = len(outcomes)
        wait_until(lambda: len(outcomes) > before_last + 50, "the survivor serving alone")
        gone = (admin_pb2.BACKEND_STATE_UNHEALTHY, admin_pb2.BACKEND_STATE_EJECTED)
        wait_until(lambda: states()[replicas[0].address] in gone, "the first dead replica out")
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    assert not failures, [(e.code(), e.details()) for e in failures[:3]]  # type: ignore[attr-defined]
    with admin_channel:
        assert states()[replicas[2].address] == admin_pb2.BACKEND_STATE_READY

    # The last replica gone: the balancer reports NOT_SERVING and fails fast with UNAVAILABLE.
    replicas[2].kill()
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 10
        status = health_pb2.HealthCheckResponse.SERVING
        while time.monotonic() < deadline and status == health_pb2.HealthCheckResponse.SERVING:
            status = health.Check(health_pb2.HealthCheckRequest(), timeout=2).status
            time.sleep(0.1)
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        try:
            hash_pb2_grpc.HashServiceStub(channel).Hash(
                hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x"), timeout=5
            )  # type: ignore[arg-type]
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        else:
            raise AssertionError("a call succeeded with every replica dead")


def test_reflection_through_the_balancer_describes_hashd(dsn: str, procs: Processes) -> None:
    replicas = [procs.hashd(dsn) for _ in range(2)]
    balancer = procs.balancer([r.address for r in replicas])
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"hashmesh.v1.HashService", "hashmesh.v1.TaskService"} <= services
        pool = DescriptorPool(database)
        hash_service = pool.FindServiceByName("hashmesh.v1.HashService")
        assert hash_service.methods_by_name["HashStream"].client_streaming
        reply = hash_pb2_grpc.HashServiceStub(channel).Hash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"),
            timeout=5,  # type: ignore[arg-type]
        )
        assert reply.result.encoded.startswith("ba7816bf")
    # The admin listener describes the balancer's own services.
    with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
        assert (
            "hashmesh.v1.AdminService" in ProtoReflectionDescriptorDatabase(channel).get_services()
        )
