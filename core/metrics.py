"""Every Prometheus metric the daemons share, defined once, and the two pieces that feed them
without the daemons' help: a grpc.aio server interceptor (calls, codes, latency) and a
collector that reads connection pools at scrape time. The balancer's own families, read from
its counters at scrape time, live in ``hashmesh.balancer.collector``.

Conventions: names start with ``hashmesh_``, carry their unit (``_seconds``), counters end in
``_total``, and every label has a bounded set of values: gRPC method names come from the mesh's
own protos (anything else is ``unknown``), backends are the operator's replica addresses,
algorithms and statuses are enums. Never a client id, task id or request data as a label.

Each daemon is its own process, so the metrics live in prometheus-client's default registry;
the daemon serves them with ``start_metrics_server(port)``."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import weakref
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector, CollectorRegistry

from hashmesh.core.handlers import Context, Handler, Streaming, Unary, rewrap

log = logging.getLogger(__name__)

# Latency buckets from 0.5 ms (cached sha256) to 60 s (argon2 under load, long streams).
RPC_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
# Submit→final covers queueing: seconds to hours.
TASK_BUCKETS = (
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4 * 3600.0,
)

UNKNOWN = "unknown"

# --- gRPC server (every daemon that serves gRPC; recorded by MetricsInterceptor) -------------
GRPC_HANDLED = Counter(
    "hashmesh_grpc_server_handled_total",
    "gRPC calls completed by the server, by service, method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
GRPC_HANDLING_SECONDS = Histogram(
    "hashmesh_grpc_server_handling_seconds",
    "Time from a call's arrival to its last response message or error.",
    ["grpc_service", "grpc_method"],
    buckets=RPC_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge(
    "hashmesh_grpc_server_in_flight_calls",
    "gRPC calls being served right now.",
    ["grpc_service", "grpc_method"],
)

# --- result cache (hashd) --------------------------------------------------------------------
CACHE_HITS = Counter(
    "hashmesh_cache_hits_total",
    "Lookups answered from the cache; tier is memory (per process LRU) or shared (database).",
    ["tier"],
)
CACHE_MISSES = Counter(
    "hashmesh_cache_misses_total",
    "Lookups the cache tier could not answer.",
    ["tier"],
)
# Bound once (no label lookup per lookup) and exported at 0 from the start.
MEMORY_CACHE_HITS, MEMORY_CACHE_MISSES = CACHE_HITS.labels("memory"), CACHE_MISSES.labels("memory")
SHARED_CACHE_HITS, SHARED_CACHE_MISSES = CACHE_HITS.labels("shared"), CACHE_MISSES.labels("shared")

# --- task queue ------------------------------------------------------------------------------
TASKS_SUBMITTED = Counter(
    "hashmesh_tasks_submitted_total",
    "Tasks accepted by TaskService (idempotent repeats not counted).",
    ["algorithm"],
)
TASK_SUBMIT_WAITING = Gauge(
    "hashmesh_task_submit_waiting_calls",
    "Submissions queued in this hashd for the next shared INSERT (group commit).",
)
TASK_SUBMIT_STATEMENTS = Counter(
    "hashmesh_task_submit_statements_total",
    "Shared INSERT statements (and commits) sent for submissions (group commit).",
)
TASK_SUBMIT_CALLS = Counter(
    "hashmesh_task_submit_calls_total",
    "Submission calls carried by those statements (÷ statements: calls per commit).",
)
TASKS_CLAIMED = Counter(
    "hashmesh_tasks_claimed_total",
    "Tasks a worker claimed (a task retried three times is claimed three times).",
    ["algorithm"],
)
TASKS_SUCCEEDED = Counter(
    "hashmesh_tasks_succeeded_total",
    "Tasks that reached status succeeded.",
    ["algorithm"],
)
TASKS_FAILED = Counter(
    "hashmesh_tasks_failed_total",
    "Task attempts that failed (the task is retried or dead-lettered).",
    ["algorithm"],
)
TASKS_DEAD_LETTERED = Counter(
    "hashmesh_tasks_dead_lettered_total",
    "Tasks moved to dead_letter after their last attempt failed.",
    ["algorithm"],
)
TASK_QUEUE_DEPTH = Gauge(
    "hashmesh_task_queue_depth",
    "Tasks in the queue by status, as last read from the database (every replica reports the "
    "same queue: aggregate with max, not sum).",
    ["status"],
)
TASK_LATENCY_SECONDS = Histogram(
    "hashmesh_task_latency_seconds",
    "Time from submission to a final status (succeeded, cancelled, dead_letter).",
    ["algorithm", "status"],
    buckets=TASK_BUCKETS,
)
TASKS_PRUNED = Counter(
    "hashmesh_tasks_pruned_total",
    "Finished tasks deleted by retention, by final status.",
    ["status"],
)
TASK_PRUNE_SECONDS = Histogram(
    "hashmesh_task_prune_duration_seconds",
    "Duration of one retention run (by the process that won the pruner's lock).",
    buckets=RPC_BUCKETS,
)
WORKER_IN_FLIGHT = Gauge(
    "hashmesh_worker_in_flight_tasks",
    "Tasks this workerd is running now (bounded by its concurrency).",
)

# --- hashd CPU pool --------------------------------------------------------------------------
HASHD_CPU_QUEUE = Gauge(
    "hashmesh_hashd_cpu_queued_calls",
    "Calls waiting for a CPU thread (bounded by HASHMESH_HASHD_CPU_QUEUE).",
)
HASHD_CPU_REFUSED = Counter(
    "hashmesh_hashd_cpu_refused_total",
    "Calls refused with RESOURCE_EXHAUSTED because the CPU queue was full.",
)

# --- database (besides the pool collector below) --------------------------------------------
DB_RETRIES = Counter(
    "hashmesh_db_retries_total",
    "Database operations retried after a transient error.",
)

BUILD_INFO = Info("hashmesh_build", "The hashmesh version this process runs.")

TASK_STATUSES = ("pending", "running", "retrying", "succeeded", "cancelled", "dead_letter")


def set_queue_depth(counts: Mapping[str, int]) -> None:
    """Publish queue depth by status; statuses missing from ``counts`` read 0. Called by the
    process that owns the store (hashd) on a timer, never at scrape time."""
    for status in TASK_STATUSES:
        TASK_QUEUE_DEPTH.labels(status).set(counts.get(status, 0))


# --- gRPC server interceptor -----------------------------------------------------------------


def mesh_method_names() -> frozenset[str]:
    """Full method names (``/pkg.Service/Method``) of every service a hashmesh daemon serves:
    the hashmesh.v1 protos, grpc.health.v1 and server reflection. The bound on label values."""
    from grpc_reflection.v1alpha import reflection_pb2

    from hashmesh.v1 import admin_pb2, cache_pb2, hash_pb2, task_pb2

    names: set[str] = set()
    for module in (admin_pb2, cache_pb2, hash_pb2, task_pb2, health_pb2, reflection_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            names.update(f"/{service.full_name}/{m.name}" for m in service.methods)
    return frozenset(names)


def split_method(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` → (``pkg.Service``, ``Method``)."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return (service or UNKNOWN, method or UNKNOWN)


@dataclass
class _MethodMetrics:
    """Label children of one method, bound once so a call costs no label lookups."""

    service: str
    method: str
    latency: Any
    in_flight: Any
    handled: dict[grpc.StatusCode, Any]

    @classmethod
    def bind(cls, service: str, method: str) -> _MethodMetrics:
        return cls(
            service,
            method,
            GRPC_HANDLING_SECONDS.labels(service, method),
            GRPC_IN_FLIGHT.labels(service, method),
            {},
        )

    def done(self, code: grpc.StatusCode, started: float) -> None:
        self.latency.observe(time.perf_counter() - started)
        self.in_flight.dec()
        child = self.handled.get(code)
        if child is None:
            child = self.handled[code] = GRPC_HANDLED.labels(self.service, self.method, code.name)
        child.inc()


def final_code(context: Context, exc: BaseException | None) -> grpc.StatusCode:
    """The status a call ends with: CANCELLED when the client went away, else what the
    handler set or aborted with, else OK (no exception) or UNKNOWN (one nobody translated).
    Used by ``MetricsInterceptor`` and by the balancer's own per-call metrics."""
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    try:
        code = context.code()
    except Exception:  # grpc versions without code(): fall through
        code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # some versions return the cygrpc integer
        for status in grpc.StatusCode:
            if status.value[0] == code:
                return status
    return grpc.StatusCode.OK if exc is None else grpc.StatusCode.UNKNOWN


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every call by service, method and final status code and times it.

    Put it first in ``GrpcServer(interceptors=[MetricsInterceptor(), ...])`` so it sees the
    status the error interceptor produced. The rest of the chain runs on every call (an
    interceptor after this one may decide per call, e.g. refuse without a token); only the
    wrapping of the handler it returns is cached, per method and handler object. Methods
    outside ``known_methods`` (default: the mesh's protos) share the label ``unknown`` so a
    caller cannot grow the label set by inventing method names."""

    def __init__(self, known_methods: Iterable[str] | None = None) -> None:
        self._known = frozenset(known_methods) if known_methods is not None else mesh_method_names()
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}
        self._unknown: _MethodMetrics | None = None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        return self.wrap(handler_call_details.method, await continuation(handler_call_details))

    def wrap(self, method: str, handler: Handler | None) -> Handler | None:
        """The instrumented ``handler`` of ``method``, cached for known methods while the
        same handler object comes back (a different one, e.g. a refusal, is wrapped anew).
        Also for servers that build handlers themselves (the balancer's generic proxy
        handler) instead of running grpc.aio interceptors."""
        # Unimplemented methods get no handler; grpc answers UNIMPLEMENTED without us.
        if handler is None:
            return None
        if method in self._known:
            cached = self._wrapped.get(method)
            if cached is None or cached[0] is not handler:
                cached = self._wrapped[method] = (
                    handler,
                    _counted(handler, _MethodMetrics.bind(*split_method(method))),
                )
            return cached[1]
        # Not cached: the cache must stay bounded too.
        if self._unknown is None:
            self._unknown = _MethodMetrics.bind(UNKNOWN, UNKNOWN)
        return _counted(handler, self._unknown)


def _counted(handler: Handler, metrics: _MethodMetrics) -> Handler:
    def unary(inner: Unary) -> Unary:
        async def unary_response(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            metrics.in_flight.inc()
            try:
                result = await inner(request, context)
            except BaseException as exc:
                metrics.done(final_code(context, exc), started)
                raise
            metrics.done(final_code(context, None), started)
            return result

        return unary_response

    def streaming(inner: Streaming) -> Streaming:
        async def stream_response(request: Any, context: Context) -> AsyncIterator[Any]:
            started = time.perf_counter()
            metrics.in_flight.inc()
            try:
                async for item in inner(request, context):
                    yield item
            except BaseException as exc:
                metrics.done(final_code(context, exc), started)
                raise
            metrics.done(final_code(context, None), started)

        return stream_response

    return rewrap(handler, unary=unary, streaming=streaming)


# --- database pools --------------------------------------------------------------------------


class PoolCollector(Collector):
    """Reads ``AsyncConnectionPool.get_stats()`` at scrape time for every watched pool.

    ``get_stats`` (not ``pop_stats``) keeps psycopg's counters monotonic, as Prometheus
    counters must be. Pools with the same name are summed (one series per name)."""

    GAUGES = (
        ("pool_size", "hashmesh_db_pool_connections", "Connections the pool holds or is opening."),
        ("pool_available", "hashmesh_db_pool_idle_connections", "Idle connections in the pool."),
        (
            "pool_max",
            "hashmesh_db_pool_max_connections",
            "Most connections the pool may open (HASHMESH_DB_POOL_MAX).",
        ),
        (
            "requests_waiting",
            "hashmesh_db_pool_waiting_requests",
            "Callers waiting for a connection right now.",
        ),
    )
    COUNTERS = (
        ("requests_num", "hashmesh_db_pool_requests", "Connections requested from the pool.", 1.0),
        (
            "requests_queued",
            "hashmesh_db_pool_requests_queued",
            "Requests that had to wait for a connection.",
            1.0,
        ),
        (
            "requests_errors",
            "hashmesh_db_pool_request_errors",
            "Requests that failed (timed out waiting, or the pool was closed).",
            1.0,
        ),
        (
            "requests_wait_ms",
            "hashmesh_db_pool_request_wait_seconds",
            "Time spent waiting for a connection, summed.",
            0.001,
        ),
        (
            "connections_errors",
            "hashmesh_db_pool_connection_errors",
            "Failed attempts to open a connection.",
            1.0,
        ),
        (
            "connections_lost",
            "hashmesh_db_pool_connections_lost",
            "Connections found broken by a check.",
            1.0,
        ),
        (
            "returns_bad",
            "hashmesh_db_pool_returns_bad",
            "Connections returned in a bad state and discarded.",
            1.0,
        ),
    )

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def watch(self, pool: Any) -> None:
        with self._lock:
            self._pools.add(pool)

    def unwatch(self, pool: Any) -> None:
        with self._lock:
            self._pools.discard(pool)

    def _stats_by_name(self) -> dict[str, dict[str, float]]:
        with self._lock:
            pools = list(self._pools)
        totals: dict[str, dict[str, float]] = {}
        for pool in pools:
            try:
                stats = pool.get_stats()
            except RuntimeError:  # the event loop thread changed the counters mid-copy
                continue
            bucket = totals.setdefault(str(getattr(pool, "name", None) or "default"), {})
            for key, value in stats.items():
                bucket[key] = bucket.get(key, 0.0) + float(value)
        return totals

    def collect(self) -> Iterator[Any]:
        totals = self._stats_by_name()
        for key, name, doc in self.GAUGES:
            family = GaugeMetricFamily(name, doc, labels=["pool"])
            for pool_name, stats in totals.items():
                family.add_metric([pool_name], stats.get(key, 0.0))
            yield family
        for key, name, doc, scale in self.COUNTERS:
            counter = CounterMetricFamily(name, doc, labels=["pool"])
            for pool_name, stats in totals.items():
                counter.add_metric([pool_name], stats.get(key, 0.0) * scale)
            yield counter

    def describe(self) -> Iterator[Any]:
        # Names only, so registering never calls get_stats (pools may not exist yet).
        for _key, name, doc in self.GAUGES:
            yield GaugeMetricFamily(name, doc, labels=["pool"])
        for _key, name, doc, _scale in self.COUNTERS:
            yield CounterMetricFamily(name, doc, labels=["pool"])


POOLS = PoolCollector()
REGISTRY.register(POOLS)


def watch_pool(pool: Any) -> None:
    """Report this psycopg pool's size, waiters and errors (labelled with ``pool.name``)."""
    POOLS.watch(pool)


def unwatch_pool(pool: Any) -> None:
    POOLS.unwatch(pool)


# --- the endpoint ----------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running /metrics endpoint (a daemon thread of prometheus-client)."""

    host: str
    port: int
    _httpd: Any
    _thread: threading.Thread

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(
    port: int, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY
) -> MetricsServer:
    """Serve ``/metrics`` on ``host:port`` in a background thread; port 0 picks a free one
    (read it from ``.port``). Also records the build version once."""
    try:
        from importlib.metadata import version

        BUILD_INFO.info({"version": version("hashmesh")})
    except Exception:  # an uninstalled tree still serves metrics
        BUILD_INFO.info({"version": "unknown"})
    httpd, thread = start_http_server(port, addr=host, registry=registry)
    actual = int(httpd.server_port)
    log.info("metrics endpoint up", extra={"host": host, "port": actual})
    return MetricsServer(host, actual, httpd, thread)
