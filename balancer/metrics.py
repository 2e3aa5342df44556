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
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import grpc
from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hashmesh.balancer.budgets import BYTES_KEY, KIND_KEYS, BudgetSnapshot
from hashmesh.balancer.collector import BackendReading, BalancerReading
from hashmesh.balancer.stats import Snapshot
from hashmesh.core import metrics
from hashmesh.core.handlers import Context

if TYPE_CHECKING:
    from hashmesh.balancer.ratelimit import RateLimiter


def _by_kind(held: BudgetSnapshot | None) -> tuple[dict[str, int], dict[str, int]]:
    """Budgets in use and their total limits, by kind; nothing while budgets are off."""
    if held is None or not held.enabled:
        return {}, {}
    limits = held.limits
    in_use = dict(zip(KIND_KEYS, held.in_use, strict=True))
    caps = dict(zip(KIND_KEYS, limits.total_caps, strict=True))
    in_use[BYTES_KEY], caps[BYTES_KEY] = held.bytes, limits.total_bytes
    return in_use, caps


def reading(snap: Snapshot) -> BalancerReading:
    in_use, limits = _by_kind(snap.budgets)
    return BalancerReading(
        backends=[
            BackendReading(
                address=r.address,
                up=r.state == "ready",
                in_flight=r.in_flight,
                calls=r.calls,
                errors=r.errors,
                ejections=r.ejections,
                state=r.state,
            )
            for r in snap.replicas
        ],
        calls=snap.calls,
        retries=snap.retries,
        no_backend=snap.no_backend,
        rate_limited=snap.rate_limited,
        unauthenticated=snap.unauthenticated,
        over_budget=snap.budgets.refused if snap.budgets is not None else 0,
        budget_in_use=in_use,
        budget_limits=limits,
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

    def ended(self, context: Context, exc: BaseException, started: float) -> None:
        """The handler raised ``exc`` (an abort carrying the status, or a cancellation)."""
        self.in_flight -= 1
        self._latency.observe(time.perf_counter() - started)
        code = metrics.final_code(context, exc)
        child = self._by_code.get(code)
        if child is None:
            child = self._by_code[code] = metrics.GRPC_HANDLED.labels(
                self._service, self._method, code.name
            )
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


class SharedLimitCollector(Collector):
    """The shared rate-limit store's state, read at scrape time (nothing when it is off)."""

    def __init__(self) -> None:
        self._limiter: RateLimiter | None = None

    def watch(self, limiter: RateLimiter | None) -> None:
        self._limiter = limiter

    def collect(self) -> Iterator[Any]:
        limiter = self._limiter
        shared = limiter.shared if limiter is not None else None
        if limiter is None or shared is None:
            return
        up = GaugeMetricFamily(
            "hashmesh_balancer_shared_limit_up",
            "1 while rate limits are "
            "shared through Redis, 0 while Redis is down and each balancer "
            "process limits alone (fail open to local limits).",
        )
        up.add_metric([], float(shared.up))
        yield up
        local = CounterMetricFamily(
            "hashmesh_balancer_shared_limit_fail_open_calls",
            "Calls decided by the process's local bucket because Redis was down.",
        )
        local.add_metric([], float(limiter.fail_open_calls))
        yield local
        failures = CounterMetricFamily(
            "hashmesh_balancer_shared_limit_failures",
            "Times Redis stopped answering (each one fails open until it is back).",
        )
        failures.add_metric([], float(shared.failures))
        yield failures


SHARED_LIMIT = SharedLimitCollector()
REGISTRY.register(SHARED_LIMIT)


def watch_shared_limit(limiter: RateLimiter | None) -> None:
    """Export ``limiter``'s shared-store state at each scrape (``None`` stops)."""
    SHARED_LIMIT.watch(limiter)
