"""Who holds the budgets, as the operator sees it during an attack: a peer holding streams
from 127.0.0.2 is on top of GetStats' holders with what it holds, the totals count it against
their limits, and what it gave back is gone once its connections close. GetStats itself is the
operator's: the attacker asking on the public listener is refused."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import pytest

from hashmesh.core.identity import address_identity
from hashmesh.v1 import admin_pb2, admin_pb2_grpc
from tests.adversarial.raw_h2 import RawConnection, hold_streams
from tests.conftest import Processes

pytestmark = pytest.mark.timeout(120)

ATTACKER, OTHER_PEER = "127.0.0.2", "127.0.0.3"
HELD, OTHER_HELD = 40, 3
"""Both under the per-peer upload budget (64): every stream is admitted and stays open."""
HASH_STREAM = "/hashmesh.v1.HashService/HashStream"
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


def _stats_when(
    admin: admin_pb2_grpc.AdminServiceStub,
    check: Callable[[admin_pb2.GetStatsResponse], bool],
    timeout: float = 60.0,
) -> admin_pb2.GetStatsResponse:
    """GetStats until ``check`` holds, or the last answer after ``timeout`` for the asserts."""
    deadline = time.monotonic() + timeout
    while True:
        stats = admin.GetStats(admin_pb2.GetStatsRequest(top_peers=5), timeout=10)
        if check(stats) or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def test_operator_sees_who_holds_the_streams(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(dsn)
    # No idle limit: the held streams send nothing and must stay held while the test reads.
    balancer = procs.balancer([replica.address], env={"HASHMESH_BALANCER_STREAM_IDLE_SECONDS": "0"})
    address = balancer.addresses["balancer"]
    channel = grpc.insecure_channel(balancer.addresses["balancer admin"])
    admin = admin_pb2_grpc.AdminServiceStub(channel)
    held = [
        hold_streams(address, ATTACKER, HASH_STREAM, HELD),
        hold_streams(address, OTHER_PEER, HASH_STREAM, OTHER_HELD),
    ]
    try:
        stats = _stats_when(admin, lambda s: s.budgets.upload_streams.in_use == HELD + OTHER_HELD)
        assert not [r for _, results in held for r in results if r.ended.is_set()]
        uploads = stats.budgets.upload_streams
        assert (uploads.in_use, uploads.total_limit, uploads.peer_limit) == (43, 1024, 64)
        assert stats.budgets.unary_calls.total_limit == 4096
        assert stats.budgets.watch_streams.in_use == stats.budgets.other_streams.in_use == 0
        top = [(p.peer, p.upload_streams) for p in stats.top_holding_peers]
        assert top[:2] == [
            (address_identity(ATTACKER), HELD),
            (address_identity(OTHER_PEER), OTHER_HELD),
        ], top
        assert stats.over_budget == 0

        # The attacker cannot read who holds what: AdminService is not served to it.
        probe = RawConnection(address, ATTACKER)
        try:
            refused = probe.open(
                "/hashmesh.v1.AdminService/GetStats",
                message=admin_pb2.GetStatsRequest().SerializeToString(),
                end=True,
            )
            assert refused.ended.wait(30)
            assert refused.status == PERMISSION_DENIED, (refused.status, refused.message)
        finally:
            probe.close()
    finally:
        for connections, _ in held:
            for connection in connections:
                connection.close()
    try:
        # Closed connections give their budgets back, and the peers leave the table.
        stats = _stats_when(admin, lambda s: s.budgets.upload_streams.in_use == 0)
        assert stats.budgets.upload_streams.in_use == 0
        assert address_identity(ATTACKER) not in [p.peer for p in stats.top_holding_peers]
    finally:
        channel.close()
