"""The balancer's Prometheus metrics, in the names of ``hashmesh.core.metrics``.

Two sources, neither adding a layer to the forwarding path:
- ``reading`` turns ``Balancer.snapshot()`` into the reading ``hashmesh.balancer.collector``
  publishes on the scrape thread (nothing is recorded per call for them).
- ``CallMetrics`` counts the calls the public listener forwards, by service, method and final
  status code, with their latency: the proxy's handlers record into label children bound once
  per method (and per method and code), which is cheaper than a grpc.aio interceptor wrapping
  every handler. Method labels are bounded: names outside the mesh's protos are ``unknown``."""

from __future__ import annotations

import time
from typing import Any

import grpc

from hashmesh.balancer.collector import BackendReading, BalancerReading
from hashmesh.balancer.stats import Snapshot
from hashmesh.core import metrics


def reading(snap: Snapshot) -> BalancerReading:
    return BalancerReading(
        backends=[
            BackendReading(
                address=r.address, up=r.state == "ready", in_flight=r.in_flight, calls=r.calls,
                errors=r.errors, ejections=r.ejections, state=r.state,
            )
            for r in snap.replicas
        ],
        calls=snap.calls,
        retries=snap.retries,
        no_backend=snap.no_backend,
        rate_limited=snap.rate_limited,
        unauthenticated=snap.unauthenticated,
    )


class MethodCalls:
    """One method's label children. ``in_flight`` is a plain integer the handler moves (read
    by the gauge at scrape time), so a call takes no lock for it."""

    __slots__ = ("_by_code", "_latency", "_method", "_ok", "_service", "in_flight")

    def __init__(self, service: str, method: str) -> None:
        self._service = service
        self._method = method
        self._latency = metrics.GRPC_HANDLING_SECONDS.labels(service, method)
        self._ok = metrics.GRPC_HANDLED.labels(service, method, grpc.StatusCode.OK.name)
        self._by_code: dict[grpc.StatusCode, Any] = {grpc.StatusCode.OK: self._ok}
        self.in_flight = 0
        metrics.GRPC_IN_FLIGHT.labels(service, method).set_function(lambda: self.in_flight)

    def ok(self, started: float) -> None:
        """The call ended with OK; ``started`` is its ``time.perf_counter()`` at arrival."""
        self.in_flight -= 1
        self._latency.observe(time.perf_counter() - started)
        self._ok.inc()

    def ended(self, context: grpc.aio.ServicerContext, exc: BaseException, started: float) -> None:
        """The handler raised ``exc`` (an abort carrying the status, or a cancellation)."""
        self.in_flight -= 1
        self._latency.observe(time.perf_counter() - started)
        code = metrics.final_code(context, exc)
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = metrics.GRPC_HANDLED.labels(self._service, self._method,
                                                                      code.name)
        child.inc()


class CallMetrics:
    """``MethodCalls`` per full method name, made when the router first builds its handler."""

    def __init__(self) -> None:
        self._known = metrics.mesh_method_names()
        self._methods: dict[str, MethodCalls] = {}
        self._unknown: MethodCalls | None = None

    def method(self, full_method: str) -> MethodCalls:
        if full_method not in self._known:
            if self._unknown is None:
                self._unknown = MethodCalls(metrics.UNKNOWN, metrics.UNKNOWN)
            return self._unknown
        found = self._methods.get(full_method)
        if found is None:
            found = self._methods[full_method] = MethodCalls(*metrics.split_method(full_method))
        return found
