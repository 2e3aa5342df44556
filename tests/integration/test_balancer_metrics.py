"""The balancer's Prometheus endpoint, scraped over HTTP from a real process after real calls
through it: per-replica picks, in-flight calls and states, rate-limit refusals, retries and
ejections after a replica dies, and the client-facing calls by method and status code."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from hashmesh.v1 import admin_pb2, admin_pb2_grpc, common_pb2, hash_pb2, hash_pb2_grpc
from tests.integration.test_balancer_proxy import start_backends
from tests.procs import Proc, start_process, wait_serving
from tests.scrape import eventually, scrape, value

HASH = {"grpc_service": "hashmesh.v1.HashService", "grpc_method": "Hash"}
REQUEST = hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"abc")
TOKEN = "metrics-admin-token"


def call(
    stub: hash_pb2_grpc.HashServiceStub, client: str, *extra: tuple[str, str]
) -> grpc.StatusCode:
    try:
        stub.Hash(REQUEST, timeout=10, metadata=(("x-client-id", client), *extra))
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


@pytest.fixture
def started() -> Iterator[Callable[[Proc], Proc]]:
    """Keeps the processes a test starts; stops them, last first, at teardown."""
    procs: list[Proc] = []

    def keep(proc: Proc) -> Proc:
        procs.append(proc)
        return proc

    yield keep
    for proc in reversed(procs):
        proc.terminate()


def test_balancer_metrics_from_a_real_process(
    tmp_path: Path, started: Callable[[Proc], Proc]
) -> None:
    backends = [started(b) for b in start_backends(tmp_path, 2)]
    addresses = [b.address for b in backends]
    balancer = started(
        start_process(
            "balancer",
            [
                "hashmesh.balancer",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--backends",
                ",".join(addresses),
                "--strategy",
                "round_robin",
                "--rate-limit",
                "1000/1000",
                "--metrics-port",
                "0",
            ],
            log_dir=tmp_path,
            # Health checked at start only: the killed replica is caught by failing calls
            # (ejection), never by a check that a loaded machine happens to run first.
            env={
                "HASHMESH_BALANCER_HEALTH_INTERVAL": "600",
                "HASHMESH_BALANCER_HEALTH_TIMEOUT": "5",
                "HASHMESH_ADMIN_TOKEN": TOKEN,
                "HASHMESH_BALANCER_RATE_LIMIT_OVERRIDES": "flooder=0.2/5",
                # The test's clients all come from 127.0.0.1: trusted, so x-client-id tells them apart.
                "HASHMESH_BALANCER_TRUSTED_PROXIES": "127.0.0.1",
            },
            expect=("balancer", "balancer admin", "balancer metrics"),
        )
    )
    # The two lines the test bed and `hashctl up` wait for come first, metrics last.
    assert list(balancer.addresses) == ["balancer", "balancer admin", "balancer metrics"]
    metrics_address = balancer.addresses["balancer metrics"]
    assert metrics_address.startswith("127.0.0.1:")
    wait_serving(balancer.address)

    before = scrape(metrics_address)
    assert value(before, "hashmesh_balancer_backends") == 2.0
    for address in addresses:
        assert value(before, "hashmesh_balancer_backend_up", backend=address) == 1.0
        assert (
            value(before, "hashmesh_balancer_backend_state", backend=address, state="ready") == 1.0
        )
        assert (
            value(before, "hashmesh_balancer_backend_state", backend=address, state="ejected")
            == 0.0
        )
        assert value(before, "hashmesh_balancer_picks_total", backend=address) == 0.0
    assert value(before, "hashmesh_grpc_server_handled_total", **HASH, grpc_code="OK") is None

    channel = grpc.insecure_channel(balancer.address)
    stub = hash_pb2_grpc.HashServiceStub(channel)
    try:
        # Calls and codes: 10 OK spread by round robin, one INVALID_ARGUMENT from a replica.
        assert [call(stub, "polite") for _ in range(10)] == [grpc.StatusCode.OK] * 10
        assert call(stub, "polite", ("x-test-error", "rich")) is grpc.StatusCode.INVALID_ARGUMENT
        handled = "hashmesh_grpc_server_handled_total"
        # A call is counted once its status is sent, which may be just after the client has
        # it: wait for the count to reach the calls made, then compare every figure exactly.
        after_calls = eventually(
            lambda: scrape(metrics_address),
            lambda s: value(s, "hashmesh_grpc_server_handling_seconds_count", **HASH) == 11.0,
        )
        assert value(after_calls, handled, **HASH, grpc_code="OK") == 10.0
        assert value(after_calls, handled, **HASH, grpc_code="INVALID_ARGUMENT") == 1.0
        assert value(after_calls, "hashmesh_grpc_server_handling_seconds_count", **HASH) == 11.0
        assert value(after_calls, "hashmesh_balancer_calls_total") == 11.0
        picks = [value(after_calls, "hashmesh_balancer_picks_total", backend=a) for a in addresses]
        assert sorted(picks) == [5.0, 6.0]  # type: ignore[type-var]
        assert (
            sum(
                value(after_calls, "hashmesh_balancer_backend_errors_total", backend=a) or 0
                for a in addresses
            )
            == 1.0
        )

        # In flight: four slow calls held open, seen per replica and per method.
        slow = [
            stub.Hash.future(REQUEST, timeout=20, metadata=(("x-test-sleep", "3"),))
            for _ in range(4)
        ]
        holding = eventually(
            lambda: scrape(metrics_address),
            lambda s: (
                sum(
                    value(s, "hashmesh_balancer_backend_in_flight_calls", backend=a) or 0
                    for a in addresses
                )
                == 4.0
            ),
        )
        assert [
            value(holding, "hashmesh_balancer_backend_in_flight_calls", backend=a)
            for a in addresses
        ] == [2.0, 2.0]
        assert value(holding, "hashmesh_grpc_server_in_flight_calls", **HASH) == 4.0
        for future in slow:
            future.result()
        done = eventually(
            lambda: scrape(metrics_address),
            lambda s: value(s, "hashmesh_grpc_server_in_flight_calls", **HASH) == 0.0,
        )
        assert value(done, "hashmesh_grpc_server_in_flight_calls", **HASH) == 0.0
        assert all(
            value(done, "hashmesh_balancer_backend_in_flight_calls", backend=a) == 0.0
            for a in addresses
        )

        # A flood over the client's limit: refusals counted, and by code.
        codes = [call(stub, "flooder") for _ in range(30)]
        refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert refused >= 15 and codes.count(grpc.StatusCode.OK) == 30 - refused
        flooded = eventually(
            lambda: scrape(metrics_address),
            lambda s: value(s, handled, **HASH, grpc_code="RESOURCE_EXHAUSTED") == float(refused),
        )
        assert value(flooded, "hashmesh_balancer_rate_limited_total") == float(refused)
        assert value(flooded, handled, **HASH, grpc_code="RESOURCE_EXHAUSTED") == float(refused)

        # A replica dies: calls to it fail to connect, are retried on the other one (no
        # client sees an error), and the dead one is ejected.
        dead, alive = backends[1], addresses[0]
        dead.kill()
        assert [call(stub, "polite") for _ in range(12)] == [grpc.StatusCode.OK] * 12
        failed_over = eventually(
            lambda: scrape(metrics_address),
            lambda s: value(s, "hashmesh_balancer_backend_up", backend=dead.address) == 0.0,
        )
        assert (value(failed_over, "hashmesh_balancer_retries_total") or 0) >= 1.0
        assert value(failed_over, "hashmesh_balancer_ejections_total", backend=dead.address) == 1.0
        assert (
            value(
                failed_over,
                "hashmesh_balancer_backend_state",
                backend=dead.address,
                state="ejected",
            )
            == 1.0
        )
        assert value(failed_over, "hashmesh_balancer_backend_up", backend=alive) == 1.0
        assert value(failed_over, "hashmesh_balancer_no_backend_total") == 0.0
        assert value(failed_over, handled, **HASH, grpc_code="UNAVAILABLE") is None
    finally:
        channel.close()

    # Admin calls on the admin listener are counted too, and the metrics interceptor does not
    # let a call without the token through once the method's handler is cached.
    admin_channel = grpc.insecure_channel(balancer.addresses["balancer admin"])
    admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
    try:
        admin.GetStats(
            admin_pb2.GetStatsRequest(),
            timeout=10,
            metadata=(("authorization", f"Bearer {TOKEN}"),),
        )
        with pytest.raises(grpc.RpcError) as refusal:
            admin.GetStats(admin_pb2.GetStatsRequest(), timeout=10)
        assert refusal.value.code() is grpc.StatusCode.UNAUTHENTICATED
    finally:
        admin_channel.close()
    final = eventually(
        lambda: scrape(metrics_address),
        lambda s: (
            value(
                s,
                "hashmesh_grpc_server_handled_total",
                grpc_service="hashmesh.v1.AdminService",
                grpc_method="GetStats",
                grpc_code="OK",
            )
            == 1.0
        ),
    )
    assert (
        value(
            final,
            "hashmesh_grpc_server_handled_total",
            grpc_service="hashmesh.v1.AdminService",
            grpc_method="GetStats",
            grpc_code="OK",
        )
        == 1.0
    )
    # Labels never carry a client's identity.
    assert not any(v in ("flooder", "polite") for _, labels in final for _, v in labels)


def test_balancer_without_a_metrics_port_serves_no_endpoint(
    tmp_path: Path, started: Callable[[Proc], Proc]
) -> None:
    backends = [started(b) for b in start_backends(tmp_path, 1)]
    balancer = started(
        start_process(
            "balancer",
            [
                "hashmesh.balancer",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--backends",
                backends[0].address,
            ],
            log_dir=tmp_path,
            expect=("balancer", "balancer admin"),
        )
    )
    wait_serving(balancer.address)
    assert list(balancer.addresses) == ["balancer", "balancer admin"]
    assert "metrics" not in balancer.log()
