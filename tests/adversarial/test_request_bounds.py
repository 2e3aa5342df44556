"""Attack 4 and minor #9: requests built to cost a replica seconds of work. Every repeated
field, page token and PHC string is size-checked before work starts: INVALID_ARGUMENT naming
the field, no traceback, and other clients' calls go through meanwhile."""

from __future__ import annotations

import base64
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hashmesh.v1 import hash_pb2, hash_pb2_grpc, task_pb2, task_pb2_grpc
from tests.adversarial.victim import hash_codes, ok_share
from tests.conftest import Processes

pytestmark = pytest.mark.timeout(120)

LIST_TASKS = "/hashmesh.v1.TaskService/ListTasks"


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def padded_list_tasks(statuses: int) -> bytes:
    """A ListTasksRequest of ``statuses`` packed PENDING entries (field 2), built as bytes."""
    return b"\x12" + _varint(statuses) + b"\x01" * statuses


def bad_field(err: grpc.RpcError) -> str:
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None, err
    bad = error_details_pb2.BadRequest()
    assert any(detail.Unpack(bad) for detail in status.details), status.details
    return bad.field_violations[0].field


def _refused(channel: grpc.Channel, request: bytes) -> str:
    with pytest.raises(grpc.RpcError) as refused:
        channel.unary_unary(LIST_TASKS)(request, timeout=30)
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    return bad_field(refused.value)


def test_padded_list_tasks_is_refused_and_others_go_through(dsn: str, procs: Processes) -> None:
    replicas = [procs.hashd(dsn) for _ in range(2)]
    balancer = procs.balancer([r.address for r in replicas])
    address = balancer.addresses["balancer"]
    padded = padded_list_tasks(7_000_000)  # 7 MB: under the wire limit, millions of entries
    with (
        grpc.insecure_channel(
            address, options=[("grpc.max_send_message_length", 16 << 20)]
        ) as channel,
        ThreadPoolExecutor(6) as pool,
    ):
        attacks = [pool.submit(_refused, channel, padded) for _ in range(6)]
        codes = hash_codes(address, 200, timeout=15)
        assert ok_share(codes) == 1.0, {c: codes.count(c) for c in set(codes)}
        assert [a.result() for a in attacks] == ["statuses"] * 6
    for replica in replicas:
        assert "Traceback" not in replica.log()


def test_oversized_fields_name_themselves_without_a_traceback(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn)
    nested = base64.urlsafe_b64encode(b"[" * 100_000 + b"]" * 100_000).decode()
    short_nested = base64.urlsafe_b64encode(b"[" * 300 + b"]" * 300).decode()[:500]
    with grpc.insecure_channel(replica.address) as channel:
        tasks = task_pb2_grpc.TaskServiceStub(channel)
        for token in (nested, short_nested):
            with pytest.raises(grpc.RpcError) as refused:
                tasks.ListTasks(task_pb2.ListTasksRequest(page_token=token), timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert bad_field(refused.value) == "page_token"
        hashes = hash_pb2_grpc.HashServiceStub(channel)
        for encoded in (
            "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$é" + "x" * 40,
            "$argon2id$" + "a" * 5000,
        ):
            with pytest.raises(grpc.RpcError) as refused:
                hashes.Verify(hash_pb2.VerifyRequest(data=b"pw", encoded=encoded), timeout=10)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
            assert bad_field(refused.value) == "encoded"
    assert "Traceback" not in replica.log()
