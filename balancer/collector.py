"""The balancer's counters as Prometheus families, read at scrape time: per replica (up,
in flight, picks, errors, ejections, state) and for the whole balancer (calls, retries, no
backend, rate limited, auth failures, over budget; what all peers hold of each budget and its
limit, by kind only: a label per peer would grow without bound). Nothing is recorded per call
for them."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import REGISTRY
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class BackendReading:
    """One replica as the balancer sees it."""

    address: str
    up: bool
    """In rotation: ready, not draining, not ejected."""
    in_flight: int
    calls: int
    """Attempts forwarded to the replica and finished (each retry counts)."""
    errors: int
    ejections: int
    state: str = ""
    """One of ``BACKEND_STATES`` (empty: not reported)."""


BACKEND_STATES = ("ready", "unhealthy", "ejected", "draining")


@dataclass(frozen=True)
class BalancerReading:
    """The balancer's counters since start."""

    backends: Sequence[BackendReading]
    calls: int
    retries: int
    no_backend: int
    rate_limited: int
    unauthenticated: int
    over_budget: int = 0
    budget_in_use: Mapping[str, int] = field(default_factory=dict)
    """Held now by all peers, by budget kind (empty while budgets are off)."""
    budget_limits: Mapping[str, int] = field(default_factory=dict)
    """The balancer's total limit of each kind in ``budget_in_use``."""


class BalancerCollector(Collector):
    """Turns a ``BalancerReading`` into metrics at scrape time. The reader runs on the scrape
    thread: it must only copy plain attributes (ints, strings), never await or sort."""

    def __init__(self) -> None:
        self._read: Callable[[], BalancerReading] | None = None

    def watch(self, read: Callable[[], BalancerReading] | None) -> None:
        self._read = read

    def _reading(self) -> BalancerReading | None:
        read = self._read
        if read is None:
            return None
        for _ in range(3):  # the event loop may resize a dict mid-copy; try again
            try:
                return read()
            except RuntimeError:
                continue
        return None

    def collect(self) -> Iterator[Any]:
        return self._families(self._reading())

    def describe(self) -> Iterator[Any]:
        return self._families(None)

    def _families(self, reading: BalancerReading | None) -> Iterator[Any]:
        backends = reading.backends if reading is not None else ()
        per_backend: tuple[tuple[Any, str, str, Callable[[BackendReading], float]], ...] = (
            (
                GaugeMetricFamily,
                "hashmesh_balancer_backend_up",
                "1 while the replica is in rotation, 0 while it is unhealthy, ejected or draining.",
                lambda b: float(b.up),
            ),
            (
                GaugeMetricFamily,
                "hashmesh_balancer_backend_in_flight_calls",
                "Calls the balancer has open to the replica.",
                lambda b: float(b.in_flight),
            ),
            (
                CounterMetricFamily,
                "hashmesh_balancer_picks",
                "Attempts forwarded to the replica (each retry counts), counted when they finish.",
                lambda b: float(b.calls),
            ),
            (
                CounterMetricFamily,
                "hashmesh_balancer_backend_errors",
                "Attempts to the replica that ended in an error status.",
                lambda b: float(b.errors),
            ),
            (
                CounterMetricFamily,
                "hashmesh_balancer_ejections",
                "Times the replica was ejected after consecutive connection failures.",
                lambda b: float(b.ejections),
            ),
        )
        for kind, name, doc, read in per_backend:
            family = kind(name, doc, labels=["backend"])
            for backend in backends:
                family.add_metric([backend.address], read(backend))
            yield family
        states = GaugeMetricFamily(
            "hashmesh_balancer_backend_state",
            "1 for the replica's current state, 0 for the others.",
            labels=["backend", "state"],
        )
        for backend in backends:
            if backend.state:
                for state in BACKEND_STATES:
                    states.add_metric([backend.address, state], float(backend.state == state))
        yield states
        known = GaugeMetricFamily(
            "hashmesh_balancer_backends",
            "Replicas the balancer knows (from --backends or DNS), whatever their state.",
        )
        known.add_metric([], float(len(backends)))
        yield known
        budgets = (
            (
                "hashmesh_balancer_budget_in_use",
                "Calls, streams or request bytes all peers hold now, by budget kind.",
                reading.budget_in_use if reading is not None else {},
            ),
            (
                "hashmesh_balancer_budget_limit",
                "The most all peers together may hold, by budget kind (HASHMESH_BALANCER_TOTAL_*).",
                reading.budget_limits if reading is not None else {},
            ),
        )
        for name, doc, by_kind in budgets:
            gauge = GaugeMetricFamily(name, doc, labels=["kind"])
            for kind, amount in by_kind.items():
                gauge.add_metric([kind], float(amount))
            yield gauge
        totals = (
            ("hashmesh_balancer_calls", "Calls the balancer admitted.", "calls"),
            (
                "hashmesh_balancer_retries",
                "Attempts sent again to another replica after "
                "UNAVAILABLE (within the retry budget).",
                "retries",
            ),
            (
                "hashmesh_balancer_no_backend",
                "Calls refused with UNAVAILABLE because no replica "
                "was ready or all were at their in-flight cap.",
                "no_backend",
            ),
            (
                "hashmesh_balancer_rate_limited",
                "Calls refused with RESOURCE_EXHAUSTED by the rate limiter.",
                "rate_limited",
            ),
            (
                "hashmesh_balancer_auth_failures",
                "Calls refused with UNAUTHENTICATED (API key missing or wrong).",
                "unauthenticated",
            ),
            (
                "hashmesh_balancer_over_budget",
                "Calls refused with RESOURCE_EXHAUSTED because a peer or the balancer was "
                "over a budget of calls, streams or bytes.",
                "over_budget",
            ),
        )
        for name, doc, attribute in totals:
            counter = CounterMetricFamily(name, doc)
            if reading is not None:
                counter.add_metric([], float(getattr(reading, attribute)))
            yield counter


BALANCER = BalancerCollector()
REGISTRY.register(BALANCER)


def watch_balancer(read: Callable[[], BalancerReading] | None) -> None:
    """Publish the balancer's counters: ``read`` is called at each scrape (``None`` stops)."""
    BALANCER.watch(read)
