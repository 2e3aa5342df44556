"""One path through every part: client → balancer → hashd replicas → PostgreSQL → workerd."""

from __future__ import annotations

import hashlib

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc
from tests.conftest import Mesh


def test_digests_through_the_balancer_equal_hashlib(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        for algorithm, reference in (
            (common_pb2.ALGORITHM_MD5, hashlib.md5),
            (common_pb2.ALGORITHM_SHA256, hashlib.sha256),
        ):
            for data in (b"hello", b"", bytes(range(256)) * 3):
                reply = stub.Hash(hash_pb2.HashRequest(algorithm=algorithm, data=data), timeout=10)
                assert reply.result.encoded == reference(data).hexdigest()
                assert reply.result.digest == reference(data).digest()


def test_reflection_and_health_through_the_balancer(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
        assert {"hashmesh.v1.HashService", "hashmesh.v1.TaskService"} <= services
        health = health_pb2_grpc.HealthStub(channel)
        reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_submitted_task_is_computed_by_a_worker(mesh: Mesh) -> None:
    with grpc.insecure_channel(mesh.address) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        spec = task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=b"hello")
        submitted = tasks.SubmitTask(task_pb2.SubmitTaskRequest(spec=spec), timeout=10).task
        final = None
        for update in tasks.WatchTask(task_pb2.WatchTaskRequest(id=submitted.id), timeout=30):
            final = update.task
        assert final is not None
        assert final.status == task_pb2.TASK_STATUS_SUCCEEDED
        assert final.result.encoded == hashlib.md5(b"hello").hexdigest()
        assert final.worker, "the result must come from a workerd"
