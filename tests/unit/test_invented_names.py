"""A client that invents method names must not grow any table keyed by them. The process-level
check (tests/adversarial/test_methods.py) sees only large costs through RSS noise; here each
table is asserted directly, so a cache of as little as one entry per name fails."""

from __future__ import annotations

import asyncio

import grpc

from hashmesh.balancer.backends import Replica
from hashmesh.balancer.config import BalancerSettings
from hashmesh.balancer.metrics import CallMetrics
from hashmesh.core.rpc import MAX_WRAPPED_METHODS, ErrorInterceptor

NAMES = [f"/hashmesh.v1.HashService/Invented{i}" for i in range(3000)]
KNOWN = "/hashmesh.v1.HashService/ComputeHash"


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


def test_replica_keeps_callables_for_the_contract_only() -> None:
    async def scenario() -> None:
        replica = Replica("127.0.0.1:1", "static", BalancerSettings(backends=("127.0.0.1:1",)))
        try:
            assert replica.multicallable("unary_unary", KNOWN) is replica.multicallable(
                "unary_unary", KNOWN
            )
            kept = len(replica._calls)
            for name in NAMES:
                first = replica.multicallable("unary_unary", name)
                assert replica.multicallable("unary_unary", name) is not first
            assert len(replica._calls) == kept
        finally:
            await replica.channel.close()

    asyncio.run(scenario())


def test_call_metrics_fold_invented_names_into_one() -> None:
    calls = CallMetrics()
    known = calls.method(KNOWN)
    unknown = {id(calls.method(name)) for name in NAMES}
    assert len(unknown) == 1 and calls.method(KNOWN) is known
    assert len(calls._methods) == 1


def test_error_interceptor_remembers_a_bounded_number_of_methods() -> None:
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: request)

    async def found(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[bytes, bytes]:
        return handler

    async def missing(details: grpc.HandlerCallDetails) -> None:
        return None

    async def scenario() -> None:
        interceptor = ErrorInterceptor()
        # Names no handler serves (what an inventing client sends) are never remembered ...
        for name in NAMES:
            assert await interceptor.intercept_service(missing, _Details(name)) is None
        assert len(interceptor._wrapped) == 0
        # ... and even names that a catch-all handler serves stop being kept at the bound.
        for i in range(MAX_WRAPPED_METHODS + 500):
            wrapped = await interceptor.intercept_service(found, _Details(f"/x.Y/M{i}"))
            assert wrapped is not None
        assert len(interceptor._wrapped) == MAX_WRAPPED_METHODS

    asyncio.run(scenario())
