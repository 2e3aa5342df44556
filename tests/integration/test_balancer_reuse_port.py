"""Several balancer processes on one port (SO_REUSEPORT): the kernel spreads connections."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hashmesh.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hash_pb2
from tests.integration.test_balancer_proxy import start_backends, start_balancer
from tests.procs import Proc

HASH = "/hashmesh.v1.HashService/Hash"
REQUEST = hash_pb2.HashRequest(
    algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc"
).SerializeToString()  # type: ignore[arg-type]


def _calls_seen(balancer: Proc) -> int:
    with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
        stats = admin_pb2_grpc.AdminServiceStub(channel).GetStats(
            admin_pb2.GetStatsRequest(), timeout=10
        )
        return int(stats.calls)


def _one_call_per_connection(address: str, connections: int) -> None:
    for _ in range(connections):
        # A local subchannel pool: every channel opens its own TCP connection.
        with grpc.insecure_channel(
            address, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            channel.unary_unary(HASH)(REQUEST, timeout=10)


def test_balancers_share_a_port_and_each_serves_connections(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 1)
    first = start_balancer(tmp_path, backends, "--reuse-port")
    address = first.addresses["balancer"]
    procs = [first]
    try:
        second = start_balancer(tmp_path, backends, "--reuse-port", "--listen", address)
        procs.append(second)
        assert second.addresses["balancer"] == address
        _one_call_per_connection(address, 40)
        seen = [_calls_seen(first), _calls_seen(second)]
        # 40 connections all hashed to one process: odds of 2 in 2^40.
        assert sum(seen) == 40 and min(seen) > 0, seen
        # One process gone: new connections land on the one left.
        first.terminate()
        _one_call_per_connection(address, 5)
        assert _calls_seen(second) == seen[1] + 5
    finally:
        for proc in (*procs, *backends):
            proc.terminate()


def test_without_reuse_port_a_second_balancer_cannot_take_the_port(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 1)
    first = start_balancer(tmp_path, backends)
    try:
        with pytest.raises(RuntimeError, match="cannot listen on"):
            start_balancer(
                tmp_path, backends, "--listen", first.addresses["balancer"], "--reuse-port"
            )
    finally:
        for proc in (first, *backends):
            proc.terminate()
