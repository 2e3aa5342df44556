"""Red team (issue 10): identity stamps and forwarded addresses, sent as a hostile client
would — bytes grpcio never sends, headers repeated, addresses in their other spellings."""

from __future__ import annotations

import grpc
import pytest

from hashmesh.v1 import common_pb2, hash_pb2, task_pb2, task_pb2_grpc
from tests.conftest import Processes
from tests.red_team_h2 import unary

LIST = "/hashmesh.v1.TaskService/ListTasks"
HASH = "/hashmesh.v1.HashService/Hash"
HASH_REQUEST = hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc").SerializeToString()


@pytest.mark.parametrize("expires", ["\u00b2".encode(), "\u0661\u0662".encode(), b"9" * 5000])
def test_a_stamp_with_odd_digits_is_refused_as_malformed(dsn: str, procs: Processes, expires: bytes) -> None:
    """'²' passes str.isdigit() but not int(); 5000 digits pass neither int()'s limit: before,
    each escaped as ValueError (UNKNOWN, a traceback in the replica's log)."""
    replica = procs.hashd(dsn)
    stamp = [(b"x-hashmesh-identity", b"bob"), (b"x-hashmesh-identity-sig", b"v1;operator;" + expires + b";00")]
    answer = unary(replica.address, LIST, b"", stamp)
    assert (answer[b"grpc-status"], answer.get(b"grpc-message")) == (b"16", b"malformed identity stamp")
    with grpc.insecure_channel(replica.address) as channel:  # the replica still serves
        task_pb2_grpc.TaskServiceStub(channel).ListTasks(task_pb2.ListTasksRequest(), timeout=10)
    replica.terminate()
    assert "Traceback" not in replica.log()
