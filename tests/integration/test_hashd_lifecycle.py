"""hashd under load and at shutdown: the CPU executor refuses at once while cheap calls still
answer; SIGTERM turns health NOT_SERVING, refuses new calls and finishes in-flight ones."""

from __future__ import annotations

import asyncio
import hashlib
import signal
import threading

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc
from tests.conftest import Processes
from tests.scrape import eventually, scrape, value

# Roughly 0.3-1 s of one core each on this machine: long enough to fill the executor.
HEAVY = common_pb2.Argon2Params(time_cost=4, memory_cost_kib=65536, parallelism=1)


def test_overload_is_refused_at_once_while_sha256_still_answers(dsn: str, procs: Processes) -> None:
    replica = procs.hashd(
        dsn, env={"HASHMESH_HASHD_CPU_WORKERS": "1", "HASHMESH_HASHD_CPU_QUEUE": "1"}
    )

    async def scenario() -> tuple[list[object], list[str]]:
        async with grpc.aio.insecure_channel(replica.address) as channel:
            stub = hash_pb2_grpc.HashServiceStub(channel)
            heavy = [
                asyncio.ensure_future(
                    stub.Hash(
                        hash_pb2.HashRequest(
                            algorithm=common_pb2.ALGORITHM_ARGON2ID, data=b"pw", argon2=HEAVY
                        ),
                        timeout=60,
                    )
                )
                for _ in range(8)
            ]
            await asyncio.sleep(0.05)
            cheap = []
            for i in range(20):
                reply = await stub.Hash(
                    hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"%d" % i),
                    timeout=10,
                )
                cheap.append(reply.result.encoded)
            outcomes = await asyncio.gather(*heavy, return_exceptions=True)
            return list(outcomes), cheap

    outcomes, cheap = asyncio.run(scenario())
    assert cheap == [hashlib.sha256(b"%d" % i).hexdigest() for i in range(20)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    served = [o for o in outcomes if isinstance(o, hash_pb2.HashResponse)]
    assert len(refused) + len(served) == 8
    assert 2 <= len(served) < 8 and refused
    for error in refused:
        assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(error)  # type: ignore[arg-type]
        assert status is not None
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        assert retry, "no google.rpc.RetryInfo"
        trailers = dict(error.trailing_metadata() or ())
        assert float(trailers["retry-after"]) > 0


def test_sigterm_goes_not_serving_refuses_new_calls_and_finishes_in_flight(
    dsn: str, procs: Processes
) -> None:
    # A grace period far longer than the call needs even on a loaded machine: what is tested
    # is that the call in flight is finished, not how fast.
    replica = procs.hashd(dsn, "--metrics-port", "0", env={"HASHMESH_GRACE_SECONDS": "60"})
    results: dict[str, object] = {}
    channel = grpc.insecure_channel(replica.address)
    stub = hash_pb2_grpc.HashServiceStub(channel)
    watch = health_pb2_grpc.HealthStub(channel).Watch(
        health_pb2.HealthCheckRequest(service="hashmesh.v1.HashService"), timeout=30
    )
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING

    def slow_call() -> None:
        try:
            results["reply"] = stub.Hash(
                hash_pb2.HashRequest(
                    algorithm=common_pb2.ALGORITHM_ARGON2ID,
                    data=b"pw",
                    argon2=common_pb2.Argon2Params(
                        time_cost=8, memory_cost_kib=131072, parallelism=1
                    ),
                ),
                timeout=90,
            )
        except grpc.RpcError as exc:
            results["error"] = exc

    worker = threading.Thread(target=slow_call)
    worker.start()
    # Until the replica counts the call in flight (its argon2 takes well over a second).
    hash_in_flight = {"grpc_service": "hashmesh.v1.HashService", "grpc_method": "Hash"}
    seen = eventually(
        lambda: scrape(replica.addresses["hashd metrics"]),
        lambda s: value(s, "hashmesh_grpc_server_in_flight_calls", **hash_in_flight) == 1.0,
        timeout=30,
    )
    assert value(seen, "hashmesh_grpc_server_in_flight_calls", **hash_in_flight) == 1.0
    assert worker.is_alive()
    replica.popen.send_signal(signal.SIGTERM)
    assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()

    with grpc.insecure_channel(replica.address) as fresh, pytest.raises(grpc.RpcError) as caught:
        hash_pb2_grpc.HashServiceStub(fresh).Hash(
            hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x"), timeout=5
        )
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE

    worker.join(90)
    channel.close()
    assert "error" not in results, results.get("error")
    reply = results["reply"]
    assert isinstance(reply, hash_pb2.HashResponse)
    assert reply.result.encoded.startswith("$argon2id$v=19$m=131072,t=8,p=1$")
    assert replica.popen.wait(60) == 0
