"""Attack 6: metadata grpc's own client never sends. Non-ASCII text values and oversized
metadata get a prompt INVALID_ARGUMENT naming the problem, every time, without a traceback;
metadata under the limit goes through every time (no random refusals between gRPC's soft and
hard limits)."""

from __future__ import annotations

import grpc
import pytest

from hashmesh.v1 import common_pb2, hash_pb2
from tests.adversarial.raw_h2 import RawConnection, StreamResult, wait_answered
from tests.adversarial.victim import hash_codes, ok_share
from tests.conftest import Processes

pytestmark = pytest.mark.timeout(120)

HASH = "/hashmesh.v1.HashService/Hash"
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
REQUEST = hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x").SerializeToString()  # type: ignore[arg-type]


def _send(
    connection: RawConnection, metadata: list[tuple[str, str]], count: int
) -> list[StreamResult]:
    results = [
        connection.open(HASH, metadata=metadata, message=REQUEST, end=True) for _ in range(count)
    ]
    # Each must end by itself: before, a non-ASCII value left the call open forever.
    assert wait_answered(results, count, timeout=30) == count
    return results


def test_bad_metadata_gets_a_clear_status_every_time(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn)
    balancer = procs.balancer([replica.address])
    address = balancer.addresses["balancer"]
    connection = RawConnection(address, "127.0.0.2")
    try:
        assert connection.settings_received.wait(10)
        for result in _send(connection, [("x-note", "héllo wörld")], 20):
            assert result.status == INVALID_ARGUMENT
            assert "printable ASCII" in result.message and "x-note" in result.message
        for result in _send(connection, [("x-big", "a" * 20_000)], 20):
            assert result.status == INVALID_ARGUMENT
            assert "at most 16384" in result.message
        # 12 KiB: between gRPC's default soft and hard limits, refused at random before.
        assert [r.status for r in _send(connection, [("x-big", "a" * 12_000)], 40)] == [0] * 40
    finally:
        connection.close()
    assert ok_share(hash_codes(address, 50)) == 1.0
    assert "Traceback" not in balancer.log()
    assert "Traceback" not in replica.log()
