"""Attack: one peer opens unary calls and never sends their request message. On the
synchronous listener (``balancer.sync_server``) each such call waits on a pool thread; past
its address's share of waiting calls the peer is refused at once with RESOURCE_EXHAUSTED and
RetryInfo, so the pool's threads stay for the others: another peer's calls go through while
the streams are held, and so do the attacker's own once it sends its messages."""

from __future__ import annotations

import grpc
import pytest

from tests.adversarial.raw_h2 import hold_streams, wait_answered
from tests.adversarial.victim import hash_codes, ok_share
from tests.conftest import Processes

pytestmark = pytest.mark.timeout(120)

ATTACKER = "127.0.0.2"
HASH = "/hashmesh.v1.HashService/Hash"
WATCH = "/hashmesh.v1.TaskService/WatchTask"
RESOURCE_EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
# Small budgets make small pools (balancer.sync_server.pool_sizes): 32 + 8 + 64 threads for
# calls with one answer, 8 + 8 + 64 for response streams; an address may have 20 waiting (a quarter of 80), more
# than the 16 calls the other peer has in flight at once.
SMALL_POOLS = {
    "HASHMESH_BALANCER_TOTAL_CALLS": "32",
    "HASHMESH_BALANCER_TOTAL_UPLOAD_STREAMS": "8",
    "HASHMESH_BALANCER_TOTAL_WATCH_STREAMS": "8",
    "HASHMESH_BALANCER_TOTAL_OTHER_STREAMS": "8",
}
HELD = 400  # more than either pool has threads
WAITING = 20


@pytest.mark.parametrize("method", [HASH, WATCH])
def test_calls_without_their_message_cannot_take_the_pool(
    dsn: str, procs: Processes, method: str
) -> None:
    replica = procs.hashd(dsn)
    balancer = procs.balancer([replica.address], env=SMALL_POOLS)
    address = balancer.addresses["balancer"]
    connections, results = hold_streams(address, ATTACKER, method, HELD)
    try:
        # All but the address's share are refused at once, with the budget's RetryInfo.
        assert wait_answered(results, HELD - WAITING) >= HELD - WAITING
        refused = [r for r in results if r.ended.is_set() and r.status == RESOURCE_EXHAUSTED]
        assert len(refused) >= HELD - WAITING, {r.status for r in results if r.ended.is_set()}
        details = refused[0].details()
        assert details is not None
        assert any(d.type_url.endswith("google.rpc.RetryInfo") for d in details.details)
        # What another peer sees while the attacker's calls wait.
        codes = hash_codes(address, 100)
        assert ok_share(codes) == 1.0, {c: codes.count(c) for c in set(codes)}
    finally:
        for connection in connections:
            connection.close()
