from __future__ import annotations

import hashlib

import grpc

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc
from tests.conftest import Processes


def test_hashd_serves_sha256_and_rejects_missing_algorithm(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn)
    with grpc.insecure_channel(replica.address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        reply = stub.Hash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"hello"), timeout=5
        )
        assert reply.result.encoded == hashlib.sha256(b"hello").hexdigest()
        try:
            stub.Hash(hash_pb2.HashRequest(data=b"hello"), timeout=5)
        except grpc.RpcError as err:
            assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
            assert "algorithm" in (err.details() or "")
        else:
            raise AssertionError("missing algorithm was accepted")
