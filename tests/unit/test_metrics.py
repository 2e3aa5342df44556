"""hashmesh.core.metrics: a real grpc.aio server on loopback with MetricsInterceptor, scraped
over HTTP from start_metrics_server and parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import psycopg_pool
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from hashmesh.balancer import collector
from hashmesh.core import metrics
from hashmesh.core.errors import InvalidArgument
from hashmesh.core.rpc import GrpcServer
from hashmesh.v1 import common_pb2, hash_pb2, hash_pb2_grpc

HASH_SERVICE = "hashmesh.v1.HashService"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class FakeHashService(hash_pb2_grpc.HashServiceServicer):
    """Answers OK for data, INVALID_ARGUMENT without; HashStream counts the chunks."""

    async def Hash(self, request: hash_pb2.HashRequest, context: Any) -> hash_pb2.HashResponse:
        if not request.data:
            raise InvalidArgument("data", "must not be empty")
        return hash_pb2.HashResponse()

    async def HashStream(
        self, request_iterator: AsyncIterator[hash_pb2.HashStreamRequest], context: Any
    ) -> hash_pb2.HashStreamResponse:
        async for _ in request_iterator:
            pass
        return hash_pb2.HashStreamResponse()


@pytest.fixture(scope="module")
def endpoint() -> Iterator[metrics.MetricsServer]:
    server = metrics.start_metrics_server(0, host="127.0.0.1")
    try:
        yield server
    finally:
        server.close()


def scrape(endpoint: metrics.MetricsServer) -> Samples:
    with urllib.request.urlopen(f"http://{endpoint.address}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def serve_and_call(interceptor: metrics.MetricsInterceptor) -> None:
    server = GrpcServer("127.0.0.1:0", interceptors=[interceptor])
    server.add(hash_pb2_grpc.add_HashServiceServicer_to_server, HASH_SERVICE, FakeHashService())
    await server.start()
    await server.set_serving(True)
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = hash_pb2_grpc.HashServiceStub(channel)
            request = hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x")
            for _ in range(3):
                await stub.Hash(request, timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Hash(hash_pb2.HashRequest(), timeout=5)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT

            async def chunks() -> AsyncIterator[hash_pb2.HashStreamRequest]:
                for _ in range(4):
                    yield hash_pb2.HashStreamRequest()

            await stub.HashStream(chunks(), timeout=5)
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            # A method nobody serves: grpc answers UNIMPLEMENTED, no label is made up for it.
            invented = channel.unary_unary("/evil.Service/Method-123")
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await invented(b"", timeout=5)
            assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(0)


def test_interceptor_counts_calls_by_method_and_code(endpoint: metrics.MetricsServer) -> None:
    before = scrape(endpoint)
    asyncio.run(serve_and_call(metrics.MetricsInterceptor()))
    after = scrape(endpoint)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    handled = "hashmesh_grpc_server_handled_total"
    assert delta(handled, grpc_service=HASH_SERVICE, grpc_method="Hash", grpc_code="OK") == 3
    assert (
        delta(handled, grpc_service=HASH_SERVICE, grpc_method="Hash", grpc_code="INVALID_ARGUMENT")
        == 1
    )
    assert delta(handled, grpc_service=HASH_SERVICE, grpc_method="HashStream", grpc_code="OK") == 1
    assert (
        delta(handled, grpc_service="grpc.health.v1.Health", grpc_method="Check", grpc_code="OK")
        == 1
    )
    latency = "hashmesh_grpc_server_handling_seconds"
    assert delta(f"{latency}_count", grpc_service=HASH_SERVICE, grpc_method="Hash") == 4
    assert delta(f"{latency}_bucket", grpc_service=HASH_SERVICE, grpc_method="Hash", le="+Inf") == 4
    assert delta(f"{latency}_sum", grpc_service=HASH_SERVICE, grpc_method="Hash") > 0
    assert (
        value(
            after,
            "hashmesh_grpc_server_in_flight_calls",
            grpc_service=HASH_SERVICE,
            grpc_method="Hash",
        )
        == 0
    )
    services = {dict(labels).get("grpc_service") for (name, labels) in after if name == handled}
    assert "evil.Service" not in services


def test_methods_outside_the_known_set_share_one_label(endpoint: metrics.MetricsServer) -> None:
    before = scrape(endpoint)
    # Only health is "known": HashService calls must land under unknown/unknown.
    known = {"/grpc.health.v1.Health/Check"}
    asyncio.run(serve_and_call(metrics.MetricsInterceptor(known_methods=known)))
    after = scrape(endpoint)
    handled = "hashmesh_grpc_server_handled_total"
    unknown_ok = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_code": "OK"}
    assert value(after, handled, **unknown_ok) - value(before, handled, **unknown_ok) == 4


def test_mesh_method_names_cover_the_protos() -> None:
    names = metrics.mesh_method_names()
    assert "/hashmesh.v1.HashService/Hash" in names
    assert "/hashmesh.v1.TaskService/SubmitTask" in names
    assert "/hashmesh.v1.AdminService/ListBackends" in names
    assert "/grpc.health.v1.Health/Check" in names
    assert metrics.split_method("/hashmesh.v1.HashService/Hash") == (HASH_SERVICE, "Hash")
    assert metrics.split_method("garbage") == ("unknown", "garbage")


def test_queue_depth_is_published_for_every_status(endpoint: metrics.MetricsServer) -> None:
    metrics.set_queue_depth({"pending": 7, "running": 2})
    samples = scrape(endpoint)
    assert value(samples, "hashmesh_task_queue_depth", status="pending") == 7
    assert value(samples, "hashmesh_task_queue_depth", status="running") == 2
    assert ("hashmesh_task_queue_depth", (("status", "dead_letter"),)) in samples
    assert value(samples, "hashmesh_task_queue_depth", status="dead_letter") == 0


def test_balancer_reading_becomes_metrics_and_gone_replicas_disappear(
    endpoint: metrics.MetricsServer,
) -> None:
    replicas = [
        collector.BackendReading("10.0.0.9:50051", True, 3, 120, 4, 1),
        collector.BackendReading("10.0.0.10:50051", False, 0, 80, 9, 2),
    ]

    def read() -> collector.BalancerReading:
        return collector.BalancerReading(
            backends=list(replicas),
            calls=200,
            retries=5,
            no_backend=1,
            rate_limited=11,
            unauthenticated=2,
            over_budget=3,
            budget_in_use={"watch_streams": 7, "request_bytes": 512},
            budget_limits={"watch_streams": 4096, "request_bytes": 1 << 29},
        )

    collector.watch_balancer(read)
    try:
        samples = scrape(endpoint)
        assert value(samples, "hashmesh_balancer_backend_up", backend="10.0.0.9:50051") == 1
        assert value(samples, "hashmesh_balancer_backend_up", backend="10.0.0.10:50051") == 0
        assert (
            value(samples, "hashmesh_balancer_backend_in_flight_calls", backend="10.0.0.9:50051")
            == 3
        )
        assert value(samples, "hashmesh_balancer_picks_total", backend="10.0.0.10:50051") == 80
        assert (
            value(samples, "hashmesh_balancer_backend_errors_total", backend="10.0.0.10:50051") == 9
        )
        assert value(samples, "hashmesh_balancer_ejections_total", backend="10.0.0.10:50051") == 2
        assert value(samples, "hashmesh_balancer_backends") == 2
        assert value(samples, "hashmesh_balancer_calls_total") == 200
        assert value(samples, "hashmesh_balancer_retries_total") == 5
        assert value(samples, "hashmesh_balancer_no_backend_total") == 1
        assert value(samples, "hashmesh_balancer_rate_limited_total") == 11
        assert value(samples, "hashmesh_balancer_auth_failures_total") == 2
        assert value(samples, "hashmesh_balancer_over_budget_total") == 3
        assert value(samples, "hashmesh_balancer_budget_in_use", kind="watch_streams") == 7
        assert value(samples, "hashmesh_balancer_budget_limit", kind="request_bytes") == 1 << 29
        # One series per kind, none per peer.
        budget = [key for key in samples if key[0] == "hashmesh_balancer_budget_in_use"]
        assert [dict(labels) for _, labels in budget] == [
            {"kind": "watch_streams"},
            {"kind": "request_bytes"},
        ]
        replicas.pop()  # scaled away: its series go with it
        samples = scrape(endpoint)
        assert not [key for key in samples if ("backend", "10.0.0.10:50051") in key[1]]
        assert value(samples, "hashmesh_balancer_backends") == 1
    finally:
        collector.watch_balancer(None)
    assert not [key for key in scrape(endpoint) if key[0] == "hashmesh_balancer_backend_up"]


class RawProxy(grpc.GenericRpcHandler):
    """A balancer-style generic handler: bytes in, bytes out, instrumented with ``wrap``."""

    def __init__(self, interceptor: metrics.MetricsInterceptor) -> None:
        self._interceptor = interceptor

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        async def echo(request: bytes, context: Any) -> bytes:
            if not request:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "empty")
            return request

        return self._interceptor.wrap(details.method, grpc.unary_unary_rpc_method_handler(echo))


def test_wrap_instruments_generic_handlers(endpoint: metrics.MetricsServer) -> None:
    async def scenario() -> None:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([RawProxy(metrics.MetricsInterceptor())])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                verify = channel.unary_unary("/hashmesh.v1.HashService/Verify")
                assert await verify(b"abc", timeout=5) == b"abc"
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await verify(b"", timeout=5)
                assert refused.value.code() is grpc.StatusCode.FAILED_PRECONDITION
                assert await channel.unary_unary("/made.Up/Name")(b"x", timeout=5) == b"x"
        finally:
            await server.stop(0)

    before = scrape(endpoint)
    asyncio.run(scenario())
    after = scrape(endpoint)
    handled = "hashmesh_grpc_server_handled_total"
    for code, count in (("OK", 1), ("FAILED_PRECONDITION", 1)):
        labels = {"grpc_service": HASH_SERVICE, "grpc_method": "Verify", "grpc_code": code}
        assert value(after, handled, **labels) - value(before, handled, **labels) == count
    unknown = {"grpc_service": "unknown", "grpc_method": "unknown", "grpc_code": "OK"}
    assert value(after, handled, **unknown) - value(before, handled, **unknown) == 1


def test_pool_collector_reports_an_unopened_pool(endpoint: metrics.MetricsServer) -> None:
    pool = psycopg_pool.AsyncConnectionPool(
        "postgresql://nowhere.invalid/x", min_size=2, max_size=6, open=False, name="unit-pool"
    )
    metrics.watch_pool(pool)
    try:
        samples = scrape(endpoint)
    finally:
        metrics.unwatch_pool(pool)
    assert value(samples, "hashmesh_db_pool_max_connections", pool="unit-pool") == 6
    assert value(samples, "hashmesh_db_pool_waiting_requests", pool="unit-pool") == 0
    assert ("hashmesh_db_pool_request_errors_total", (("pool", "unit-pool"),)) in samples
    assert ("hashmesh_db_pool_max_connections", (("pool", "unit-pool"),)) not in scrape(endpoint)


def test_every_metric_follows_the_naming_rules(endpoint: metrics.MetricsServer) -> None:
    text = urllib.request.urlopen(f"http://{endpoint.address}/metrics", timeout=5).read().decode()
    ours = [f for f in text_string_to_metric_families(text) if f.name.startswith("hashmesh_")]
    assert len(ours) >= 20
    forbidden = {"client_id", "client", "task_id", "task", "id", "key"}
    for family in ours:
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        for sample in family.samples:
            assert not forbidden & set(sample.labels), (family.name, sample.labels)


class TokenGate(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses, per call, any call without ``x-token: yes`` (stands in for an auth check)."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        if ("x-token", "yes") in (details.invocation_metadata or ()):
            return await continuation(details)

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

        return grpc.unary_unary_rpc_method_handler(refuse)


def test_interceptors_after_metrics_still_run_on_every_call() -> None:
    """The metrics interceptor must not cache its way past a per-call decision of a later
    interceptor: an allowed call first, then a call without the token, must be refused."""

    async def scenario() -> None:
        server = GrpcServer("127.0.0.1:0", interceptors=[metrics.MetricsInterceptor(), TokenGate()])
        server.add(hash_pb2_grpc.add_HashServiceServicer_to_server, HASH_SERVICE, FakeHashService())
        await server.start()
        try:
            async with grpc.aio.insecure_channel(server.address) as channel:
                stub = hash_pb2_grpc.HashServiceStub(channel)
                request = hash_pb2.HashRequest(algorithm=common_pb2.ALGORITHM_SHA256, data=b"x")
                await stub.Hash(request, metadata=(("x-token", "yes"),), timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.Hash(request, timeout=5)
                assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED
                await stub.Hash(request, metadata=(("x-token", "yes"),), timeout=5)
        finally:
            await server.stop(0)

    asyncio.run(scenario())
