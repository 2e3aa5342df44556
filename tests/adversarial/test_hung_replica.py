"""Attack 7: a replica frozen (SIGSTOP) while it holds calls. An idempotent call that lands on
it is abandoned after the per-attempt timeout and retried on another replica, so every call
succeeds within a deadline far shorter than the freeze."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from tests.adversarial.victim import hash_codes
from tests.conftest import Processes

pytestmark = pytest.mark.timeout(120)

ATTEMPT_TIMEOUT = 1.0
DEADLINE = 8.0
"""Each call's deadline: many attempt timeouts, and far less than the replica stays frozen."""


def test_frozen_replica_costs_at_most_the_attempt_timeout(dsn: str, procs: Processes) -> None:
    replicas = [procs.hashd(dsn) for _ in range(3)]
    # Health checks as in production (1 s per check; the test bed's default is 5 s): they are
    # what takes the frozen replica out, the attempt timeout covers the calls before that.
    balancer = procs.balancer(
        [r.address for r in replicas],
        "--strategy",
        "round_robin",
        env={
            "HASHMESH_BALANCER_ATTEMPT_TIMEOUT": str(ATTEMPT_TIMEOUT),
            "HASHMESH_BALANCER_HEALTH_TIMEOUT": "1",
        },
    )
    address = balancer.addresses["balancer"]
    assert set(hash_codes(address, 30)) == {grpc.StatusCode.OK}
    frozen = replicas[0]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        # Calls in flight when it froze and calls sent before health checks notice: all of
        # them must come back OK, none waits for the deadline.
        codes = hash_codes(address, 120, timeout=DEADLINE, workers=12)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert codes == [grpc.StatusCode.OK] * 120, {c: codes.count(c) for c in set(codes)}


def test_calls_on_a_replica_that_goes_down_are_failed_over(dsn: str, procs: Processes) -> None:
    """No attempt timeout: the calls held by the frozen replica are failed over as soon as
    health checks mark it down, well within their deadline."""
    replicas = [procs.hashd(dsn) for _ in range(3)]
    balancer = procs.balancer(
        [r.address for r in replicas],
        "--strategy",
        "round_robin",
        env={
            "HASHMESH_BALANCER_ATTEMPT_TIMEOUT": "0",
            "HASHMESH_BALANCER_HEALTH_INTERVAL": "0.5",
            "HASHMESH_BALANCER_HEALTH_TIMEOUT": "1",
        },
    )
    address = balancer.addresses["balancer"]
    assert set(hash_codes(address, 30)) == {grpc.StatusCode.OK}
    frozen = replicas[0]
    os.kill(frozen.pid, signal.SIGSTOP)
    try:
        codes = hash_codes(address, 120, timeout=20, workers=12)
    finally:
        os.kill(frozen.pid, signal.SIGCONT)
    assert codes == [grpc.StatusCode.OK] * 120, {c: codes.count(c) for c in set(codes)}
    assert "Traceback" not in balancer.log()
