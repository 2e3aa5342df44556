"""The balancer as a real process in front of real test replicas (tests/balancer_backends.py):
every method kind, metadata, deadlines, cancellation, rich errors, picking, drain, admin."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from grpc_status import rpc_status

from hashmesh.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    common_pb2,
    hash_pb2,
    hash_pb2_grpc,
    task_pb2,
    task_pb2_grpc,
)
from tests.procs import Proc, start_process, wait_serving

SHA256 = common_pb2.ALGORITHM_SHA256


def start_backends(log_dir: Path, count: int, delays: dict[int, float] | None = None) -> list[Proc]:
    backends = []
    for index in range(count):
        args = ["tests.balancer_backends", "--name", f"b{index}"]
        if delays and index in delays:
            args += ["--delay", str(delays[index])]
        backends.append(
            start_process("testbackend", args, log_dir=log_dir, expect=("testbackend",))
        )
    return backends


def start_balancer(
    log_dir: Path, backends: list[Proc], *args: str, env: dict[str, str] | None = None
) -> Proc:
    proc = start_process(
        "balancer",
        [
            "hashmesh.balancer",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--backends",
            ",".join(b.address for b in backends),
            *args,
        ],
        log_dir=log_dir,
        # A generous check timeout: on a loaded machine two slow answers in a row would take a
        # live replica out of rotation. Dead replicas still fail at once (refused connections).
        env={
            "HASHMESH_BALANCER_HEALTH_INTERVAL": "0.2",
            "HASHMESH_BALANCER_HEALTH_TIMEOUT": "5",
            **(env or {}),
        },
        expect=("balancer", "balancer admin"),
    )
    wait_serving(proc.addresses["balancer"])
    return proc


def wait_all_ready(admin_address: str, count: int, timeout: float = 20.0) -> None:
    """Until the balancer reports ``count`` replicas READY."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        while True:
            listed = admin.ListBackends(admin_pb2.ListBackendsRequest(), timeout=5)
            if sum(b.state == admin_pb2.BACKEND_STATE_READY for b in listed.backends) == count:
                return
            assert time.monotonic() < deadline, f"not {count} READY: {listed}"
            time.sleep(0.05)


def logged(procs: list[Proc], text: str) -> int:
    """How many times ``procs`` have printed ``text`` so far."""
    return sum(proc.log().count(text) for proc in procs)


def wait_logged(procs: list[Proc], text: str, times: int, timeout: float = 20.0) -> None:
    """Until ``procs`` have printed ``text`` ``times`` times in all."""
    deadline = time.monotonic() + timeout
    while logged(procs, text) < times:
        assert time.monotonic() < deadline, f"{text!r} not printed {times} times"
        time.sleep(0.02)


def wait_in_flight(admin_address: str, count: int, timeout: float = 20.0) -> None:
    """Until the balancer has ``count`` calls in flight to its replicas (they arrived)."""
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(admin_address) as channel:
        admin = admin_pb2_grpc.AdminServiceStub(channel)
        while True:
            listed = admin.ListBackends(admin_pb2.ListBackendsRequest(), timeout=5)
            if sum(b.in_flight for b in listed.backends) >= count:
                return
            assert time.monotonic() < deadline, f"not {count} in flight: {listed}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, list[Proc]]]:
    """Three test replicas and a round-robin balancer, for tests that change nothing."""
    log_dir = tmp_path_factory.mktemp("balancer")
    backends = start_backends(log_dir, 3)
    balancer = start_balancer(log_dir, backends, "--strategy", "round_robin")
    try:
        yield balancer, backends
    finally:
        for proc in (balancer, *backends):
            proc.terminate()


def hash_request(data: bytes = b"abc") -> hash_pb2.HashRequest:
    return hash_pb2.HashRequest(algorithm=SHA256, data=data)  # type: ignore[arg-type]


def trailers(call: grpc.Call) -> dict[str, str | bytes]:
    return dict(call.trailing_metadata() or ())


def test_every_method_kind_goes_through_with_metadata(shared: tuple[Proc, list[Proc]]) -> None:
    balancer, _ = shared
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        hashes = hash_pb2_grpc.HashServiceStub(channel)
        reply, call = hashes.Hash.with_call(
            hash_request(), timeout=5, metadata=[("x-client-id", "alice")]
        )
        assert reply.result.encoded.startswith("ba7816bf")
        seen = trailers(call)
        # The claimed client id is not forwarded; the replica hears the balancer's stamp.
        assert seen["x-seen-client-id"] == "" and seen["x-seen-identity"] == "ip:127.0.0.1"
        assert seen["x-seen-forwarded-for"] == "127.0.0.1"
        assert dict(call.initial_metadata())["x-initial"] == seen["x-backend"]

        chunks = [hash_pb2.HashStreamRequest(header=hash_pb2.HashStreamHeader(algorithm=SHA256))]  # type: ignore[arg-type]
        chunks += [hash_pb2.HashStreamRequest(chunk=c) for c in (b"a", b"b", b"c")]
        streamed = hashes.HashStream(iter(chunks), timeout=5)
        assert streamed.total_bytes == 3 and streamed.result.encoded == reply.result.encoded

        watch = task_pb2_grpc.TaskServiceStub(channel).WatchTask(
            task_pb2.WatchTaskRequest(id="t"), timeout=5
        )
        assert [m.task.id for m in watch] == ["t-0", "t-1", "t-2"]
        assert "x-backend" in trailers(watch)

        # Bidirectional: server reflection, answered by a replica.
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"hashmesh.v1.HashService", "hashmesh.v1.TaskService"} <= services
        methods = (
            DescriptorPool(database).FindServiceByName("hashmesh.v1.TaskService").methods_by_name
        )
        assert methods["WatchTask"].server_streaming

        # A method the balancer has never heard of still goes through, and so does the answer.
        with pytest.raises(grpc.RpcError) as unknown:
            channel.unary_unary("/other.v1.Thing/Do")(b"\x01\x02", timeout=5)
        assert unknown.value.code() is grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


def test_rich_error_details_and_trailers_pass_unchanged(shared: tuple[Proc, list[Proc]]) -> None:
    balancer, _ = shared
    with (
        grpc.insecure_channel(balancer.addresses["balancer"]) as channel,
        pytest.raises(grpc.RpcError) as failed,
    ):
        hash_pb2_grpc.HashServiceStub(channel).Hash(
            hash_request(), timeout=5, metadata=[("x-test-error", "rich")]
        )
    err = failed.value
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert err.details() == "data: rich error on purpose"  # type: ignore[attr-defined]
    assert trailers(err)["x-custom"] == "kept"  # type: ignore[arg-type]
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    assert status is not None
    bad = error_details_pb2.BadRequest()
    assert [d for d in status.details if d.Unpack(bad)] and bad.field_violations[0].field == "data"


def test_deadline_and_cancellation_reach_the_replica(shared: tuple[Proc, list[Proc]]) -> None:
    balancer, backends = shared
    with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
        hashes = hash_pb2_grpc.HashServiceStub(channel)
        _, call = hashes.Hash.with_call(hash_request(), timeout=3)
        # gRPC rounds the timeout it sends up a little; what matters is that it arrived
        # (less what the hop took, which a loaded machine can stretch to seconds).
        assert 0.0 < float(trailers(call)["x-remaining"]) <= 3.1
        # No deadline: an idempotent call's attempt still gets the per-attempt timeout.
        _, call = hashes.Hash.with_call(hash_request())
        assert 5.0 < float(trailers(call)["x-remaining"]) <= 10.1
        with pytest.raises(grpc.RpcError) as late:
            hashes.Hash(hash_request(), timeout=0.3, metadata=[("x-test-sleep", "5")])
        assert late.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]

        sleeping = logged(backends, "sleeping Hash")
        future = hashes.Hash.future(hash_request(), timeout=30, metadata=[("x-test-sleep", "20")])
        wait_logged(backends, "sleeping Hash", sleeping + 1)  # it reached a replica
        assert future.cancel()
        watch = task_pb2_grpc.TaskServiceStub(channel).WatchTask(
            task_pb2.WatchTaskRequest(id="t"),
            timeout=30,
            metadata=[("x-test-sleep", "10"), ("x-test-count", "5")],
        )
        assert next(watch).task.id == "t-0"
        watch.cancel()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        logs = "".join(b.log() for b in backends)
        if "cancelled Hash" in logs and "cancelled WatchTask" in logs:
            break
        time.sleep(0.1)
    assert "cancelled Hash" in logs and "cancelled WatchTask" in logs


def test_round_robin_spreads_evenly(tmp_path: Path) -> None:
    # A balancer of its own: no earlier test's calls, and health checked once only (a probe
    # timing out on a loaded machine would take a replica out of the rotation for a while).
    backends = start_backends(tmp_path, 3)
    balancer = start_balancer(
        tmp_path,
        backends,
        "--strategy",
        "round_robin",
        env={"HASHMESH_BALANCER_HEALTH_INTERVAL": "600"},
    )
    try:
        wait_all_ready(balancer.addresses["balancer admin"], 3)
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            hashes = hash_pb2_grpc.HashServiceStub(channel)
            counts = Counter(
                trailers(hashes.Hash.with_call(hash_request(), timeout=5)[1])["x-backend"]
                for _ in range(60)
            )
    finally:
        for proc in (balancer, *backends):
            proc.terminate()
    assert sorted(counts) == ["b0", "b1", "b2"] and set(counts.values()) == {20}


def test_admin_is_refused_on_the_public_listener_without_a_token(
    shared: tuple[Proc, list[Proc]],
) -> None:
    balancer, _ = shared
    with (
        grpc.insecure_channel(balancer.addresses["balancer"]) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        admin_pb2_grpc.AdminServiceStub(channel).ListBackends(
            admin_pb2.ListBackendsRequest(), timeout=5
        )
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
        listed = admin_pb2_grpc.AdminServiceStub(channel).ListBackends(
            admin_pb2.ListBackendsRequest(), timeout=5
        )
    assert len(listed.backends) == 3
    assert {b.state for b in listed.backends} == {admin_pb2.BACKEND_STATE_READY}


def test_admin_token_is_required_everywhere_once_set(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 1)
    balancer = start_balancer(tmp_path, backends, env={"HASHMESH_ADMIN_TOKEN": "s3cret"})
    try:
        for listener in ("balancer", "balancer admin"):
            with grpc.insecure_channel(balancer.addresses[listener]) as channel:
                admin = admin_pb2_grpc.AdminServiceStub(channel)
                for metadata in ([], [("authorization", "Bearer wrong")]):
                    with pytest.raises(grpc.RpcError) as refused:
                        admin.GetStrategy(
                            admin_pb2.GetStrategyRequest(), timeout=5, metadata=metadata
                        )
                    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                reply = admin.GetStrategy(
                    admin_pb2.GetStrategyRequest(),
                    timeout=5,
                    metadata=[("authorization", "Bearer s3cret")],
                )
                assert reply.strategy == admin_pb2.STRATEGY_LEAST_CONNECTIONS
    finally:
        balancer.terminate()
        for backend in backends:
            backend.terminate()


def test_least_connections_avoids_a_slowed_replica_and_drain_stops_picks(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 3, delays={0: 0.4})
    balancer = start_balancer(tmp_path, backends, "--strategy", "least_connections")
    try:
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            hashes = hash_pb2_grpc.HashServiceStub(channel)

            def one(_: int) -> str:
                return str(
                    trailers(hashes.Hash.with_call(hash_request(), timeout=10)[1])["x-backend"]
                )

            with ThreadPoolExecutor(6) as pool:
                counts = Counter(pool.map(one, range(90)))
            assert counts["b0"] < 0.15 * 90, counts

            with grpc.insecure_channel(balancer.addresses["balancer admin"]) as admin_channel:
                admin = admin_pb2_grpc.AdminServiceStub(admin_channel)
                drained = admin.DrainBackend(
                    admin_pb2.DrainBackendRequest(address=backends[1].address), timeout=5
                )
                assert drained.backend.state == admin_pb2.BACKEND_STATE_DRAINING
                # Switching strategy at run time does not disturb a call in flight.
                slow = hashes.Hash.future(
                    hash_request(), timeout=10, metadata=[("x-test-sleep", "0.5")]
                )
                admin.SetStrategy(
                    admin_pb2.SetStrategyRequest(strategy=admin_pb2.STRATEGY_ROUND_ROBIN), timeout=5
                )
                assert slow.result().result.encoded
                with ThreadPoolExecutor(4) as pool:
                    after = Counter(pool.map(one, range(30)))
                assert after["b1"] == 0 and after["b2"] > 0, after
                with pytest.raises(grpc.RpcError) as unknown:
                    admin.DrainBackend(
                        admin_pb2.DrainBackendRequest(address="10.9.9.9:1"), timeout=5
                    )
                assert unknown.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
                # An unknown address of 10 KB: still NOT_FOUND (the echoed message is bounded,
                # not a trailer overflow reported as RESOURCE_EXHAUSTED).
                with pytest.raises(grpc.RpcError) as huge:
                    admin.DrainBackend(
                        admin_pb2.DrainBackendRequest(address="x" * 10_000), timeout=5
                    )
                assert huge.value.code() is grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
                assert len(huge.value.details()) <= 1000  # type: ignore[attr-defined]
                for key in ("Bad Key!", "x-key-bin", "grpc-timeout"):
                    with pytest.raises(grpc.RpcError) as bad_key:
                        admin.SetStrategy(
                            admin_pb2.SetStrategyRequest(
                                strategy=admin_pb2.STRATEGY_CONSISTENT_HASH, hash_key=key
                            ),
                            timeout=5,
                        )
                    assert bad_key.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
                assert admin.GetStrategy(admin_pb2.GetStrategyRequest(), timeout=5).strategy == (
                    admin_pb2.STRATEGY_ROUND_ROBIN
                )
                stats = admin.GetStats(admin_pb2.GetStatsRequest(), timeout=5)
                assert stats.calls >= 121 and stats.strategy == admin_pb2.STRATEGY_ROUND_ROBIN
                by_address = {b.address: b for b in stats.backends}
                assert (
                    by_address[backends[0].address].latency_p50.ToTimedelta().total_seconds() >= 0.4
                )
    finally:
        balancer.terminate()
        for backend in backends:
            backend.terminate()


def test_long_response_streams_stay_out_of_the_replica_latency(tmp_path: Path) -> None:
    backends = start_backends(tmp_path, 1)
    balancer = start_balancer(tmp_path, backends)
    try:
        with grpc.insecure_channel(balancer.addresses["balancer"]) as channel:
            hashes = hash_pb2_grpc.HashServiceStub(channel)
            for _ in range(20):
                hashes.Hash(hash_request(), timeout=5)
            # A watch held open for about 2 s: as long as its client keeps watching.
            watch = task_pb2_grpc.TaskServiceStub(channel).WatchTask(
                task_pb2.WatchTaskRequest(id="w"),
                timeout=30,
                metadata=[("x-test-sleep", "0.5"), ("x-test-count", "4")],
            )
            assert [m.task.id for m in watch] == ["w-0", "w-1", "w-2", "w-3"]
        with grpc.insecure_channel(balancer.addresses["balancer admin"]) as channel:
            stats = admin_pb2_grpc.AdminServiceStub(channel).GetStats(
                admin_pb2.GetStatsRequest(), timeout=5
            )
    finally:
        for proc in (balancer, *backends):
            proc.terminate()
    [backend] = stats.backends
    assert backend.calls == 21  # the watch is counted as a call...
    assert backend.latency_p99.ToTimedelta().total_seconds() < 1.0  # ...not as a latency
