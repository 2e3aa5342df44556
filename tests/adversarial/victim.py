"""What the other clients see: a well-behaved client's calls and an operator's admin call,
made with grpc's own client (from 127.0.0.1, a peer distinct from the attackers)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc

from hashmesh.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hash_pb2, hash_pb2_grpc

SHA256 = common_pb2.ALGORITHM_SHA256


def hash_codes(
    address: str, count: int, *, timeout: float = 20.0, workers: int = 16
) -> list[grpc.StatusCode]:
    """The status of each of ``count`` Hash calls (``workers`` at a time)."""
    with grpc.insecure_channel(address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)

        def one(index: int) -> grpc.StatusCode:
            try:
                stub.Hash(
                    hash_pb2.HashRequest(algorithm=SHA256, data=b"v%d" % index), timeout=timeout
                )  # type: ignore[arg-type]
                return grpc.StatusCode.OK
            except grpc.RpcError as err:
                return err.code()  # type: ignore[attr-defined,no-any-return]

        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(one, range(count)))


def stream_codes(address: str, count: int, *, timeout: float = 20.0) -> list[grpc.StatusCode]:
    """The status of each of ``count`` HashStream calls of three messages."""

    def messages() -> Iterator[hash_pb2.HashStreamRequest]:
        yield hash_pb2.HashStreamRequest(header=hash_pb2.HashStreamHeader(algorithm=SHA256))  # type: ignore[arg-type]
        yield hash_pb2.HashStreamRequest(chunk=b"a" * 1000)
        yield hash_pb2.HashStreamRequest(chunk=b"b" * 1000)

    codes = []
    with grpc.insecure_channel(address) as channel:
        stub = hash_pb2_grpc.HashServiceStub(channel)
        for _ in range(count):
            try:
                stub.HashStream(messages(), timeout=timeout)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())  # type: ignore[attr-defined]
    return codes


def admin_answers(admin_address: str, timeout: float = 10.0) -> bool:
    with grpc.insecure_channel(admin_address) as channel:
        admin_pb2_grpc.AdminServiceStub(channel).GetStats(
            admin_pb2.GetStatsRequest(), timeout=timeout
        )
    return True


def ok_share(codes: list[grpc.StatusCode]) -> float:
    return sum(1 for c in codes if c is grpc.StatusCode.OK) / len(codes)
