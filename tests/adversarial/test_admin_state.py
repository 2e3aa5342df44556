"""Attack 8 (a crash): strategy, rate limits and drains set through AdminService survive
``kill -9`` of the balancer; the new process applies them before it takes a call."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from hashmesh.v1 import admin_pb2, admin_pb2_grpc
from tests.adversarial.victim import hash_codes
from tests.conftest import Processes
from tests.procs import Proc, start_process

pytestmark = pytest.mark.timeout(120)


def start_test_backends(procs: Processes, count: int) -> list[Proc]:
    started = [
        start_process(
            "testbackend",
            ["tests.balancer_backends", "--name", f"b{i}"],
            log_dir=procs.log_dir,
            expect=("testbackend",),
        )
        for i in range(count)
    ]
    procs.started.extend(started)
    return started


def test_admin_changes_survive_kill_9(procs: Processes, tmp_path: Path) -> None:
    backends = start_test_backends(procs, 2)
    state = tmp_path / "state" / "balancer.json"
    args = ("--state-file", str(state))
    first = procs.balancer([b.address for b in backends], *args)
    drained = backends[1].address
    with grpc.insecure_channel(first.addresses["balancer admin"]) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        admin.SetStrategy(
            admin_pb2.SetStrategyRequest(
                strategy=admin_pb2.STRATEGY_CONSISTENT_HASH, hash_key="x-tenant"
            ),
            timeout=10,
        )
        admin.SetRateLimits(
            admin_pb2.SetRateLimitsRequest(
                default_limit=admin_pb2.RateLimit(rate_per_second=0.5, burst=3),
                upsert_overrides=[
                    admin_pb2.ClientRateLimit(
                        client_id="batch-7",
                        limit=admin_pb2.RateLimit(rate_per_second=50, burst=100),
                    )
                ],
            ),
            timeout=10,
        )
        admin.DrainBackend(admin_pb2.DrainBackendRequest(address=drained), timeout=10)
    first.kill()

    second = procs.balancer([b.address for b in backends], *args)
    with grpc.insecure_channel(second.addresses["balancer admin"]) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        strategy = admin.GetStrategy(admin_pb2.GetStrategyRequest(), timeout=10)
        limits = admin.GetRateLimits(admin_pb2.GetRateLimitsRequest(), timeout=10)
        states = {
            b.address: b.state
            for b in admin.ListBackends(admin_pb2.ListBackendsRequest(), timeout=10).backends
        }
    assert (strategy.strategy, strategy.hash_key) == (
        admin_pb2.STRATEGY_CONSISTENT_HASH,
        "x-tenant",
    )
    assert (limits.default_limit.rate_per_second, limits.default_limit.burst) == (0.5, 3)
    assert [(o.client_id, o.limit.rate_per_second) for o in limits.overrides] == [("batch-7", 50)]
    assert states[drained] == admin_pb2.BACKEND_STATE_DRAINING
    # The limit is in force, not only reported: a burst of 3, then refusals.
    codes = hash_codes(second.addresses["balancer"], 10, workers=1)
    assert codes[:3] == [grpc.StatusCode.OK] * 3
    assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes[3:]


def test_an_unreadable_state_file_stops_the_start_with_its_name(
    procs: Processes, tmp_path: Path
) -> None:
    backends = start_test_backends(procs, 1)
    state = tmp_path / "balancer.json"
    state.write_text('{"version": 1, "strategy": "nonsense"}')
    with pytest.raises(RuntimeError) as failed:
        procs.balancer([backends[0].address], "--state-file", str(state))
    assert "state file is not usable" in str(failed.value)
    assert "Traceback" not in str(failed.value)
