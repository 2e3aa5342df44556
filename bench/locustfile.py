"""Locust load against the balancer with gRPC users.

    locust -f bench/locustfile.py --host 127.0.0.1:50050               # web UI on :8089
    locust -f bench/locustfile.py --headless -u 50 -r 10 -t 1m --host 127.0.0.1:50050

``HashUser`` hashes now (Hash, Verify and the HashStream client stream); ``TaskUser`` submits
tasks and reads them back. Every call shows up in locust's stats under its gRPC method name,
failures under their gRPC status."""

from __future__ import annotations

import hashlib
import os

from locust import between, task

from hashmesh.cli.locust_grpc import GrpcUser
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc

PAYLOAD = os.urandom(512)
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
STREAM_CHUNK = os.urandom(64 * 1024)
STREAM_CHUNKS = 8


class HashUser(GrpcUser):
    stub_class = hash_pb2_grpc.HashServiceStub
    wait_time = between(0.0, 0.05)
    weight = 4

    @task(10)
    def hash_sha256(self) -> None:
        reply = self.stub.ComputeHash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=PAYLOAD),
            timeout=10,
            metadata=self.metadata,
        )
        assert reply.result.encoded == PAYLOAD_SHA256

    @task(3)
    def hash_md5(self) -> None:
        self.stub.ComputeHash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_MD5, data=PAYLOAD),
            timeout=10,
            metadata=self.metadata,
        )

    @task(2)
    def verify(self) -> None:
        self.stub.Verify(
            hash_pb2.VerifyRequest(
                algorithm=common_pb2.ALGORITHM_SHA256, data=PAYLOAD, encoded=PAYLOAD_SHA256
            ),
            timeout=10,
            metadata=self.metadata,
        )

    @task(1)
    def hash_stream(self) -> None:
        def messages():  # type: ignore[no-untyped-def]
            yield hash_pb2.HashStreamRequest(
                header=hash_pb2.HashStreamHeader(algorithm=common_pb2.ALGORITHM_SHA256)
            )
            for _ in range(STREAM_CHUNKS):
                yield hash_pb2.HashStreamRequest(chunk=STREAM_CHUNK)

        self.stub.HashStream(messages(), timeout=30, metadata=self.metadata)


class TaskUser(GrpcUser):
    stub_class = task_pb2_grpc.TaskServiceStub
    wait_time = between(0.05, 0.2)
    weight = 1

    @task
    def submit_and_get(self) -> None:
        reply = self.stub.SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_MD5, data=PAYLOAD)
            ),
            timeout=10,
            metadata=self.metadata,
        )
        self.stub.GetTask(
            task_pb2.GetTaskRequest(id=reply.task.id), timeout=10, metadata=self.metadata
        )

    @task
    def submit_and_watch(self) -> None:
        reply = self.stub.SubmitTask(
            task_pb2.SubmitTaskRequest(
                spec=task_pb2.TaskSpec(algorithm=common_pb2.ALGORITHM_SHA256, data=PAYLOAD)
            ),
            timeout=10,
            metadata=self.metadata,
        )
        for update in self.stub.WatchTask(
            task_pb2.WatchTaskRequest(id=reply.task.id), timeout=30, metadata=self.metadata
        ):
            last = update.task
        assert last.status == task_pb2.TASK_STATUS_SUCCEEDED
