"""Wiring of one hashd replica: pool, migrations, services, lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging

from hashmesh.core import metrics
from hashmesh.core.errors import HashmeshError
from hashmesh.core.hashing.cache import ResultCache
from hashmesh.core.queue import db, migrations
from hashmesh.core.queue.cache_table import CLEAR_CHANNEL, PostgresCacheTable
from hashmesh.core.queue.model import TaskStore
from hashmesh.core.queue.store import NOTIFY_STATUS, Listener, PostgresTaskStore
from hashmesh.core.rpc import GrpcServer
from hashmesh.core.signals import wait_for_signal
from hashmesh.hashd.cache_service import CacheService
from hashmesh.hashd.config import HashdSettings
from hashmesh.hashd.executor import BoundedExecutor
from hashmesh.hashd.hash_service import HashService, add_hash_service
from hashmesh.hashd.identity import CallerResolver, IdentityInterceptor
from hashmesh.hashd.task_service import TaskService
from hashmesh.hashd.watch import WatchHub
from hashmesh.v1 import cache_pb2, cache_pb2_grpc, hash_pb2, task_pb2, task_pb2_grpc

log = logging.getLogger(__name__)


class Hashd:
    """One replica. ``start()`` opens the pool, migrates and serves; ``stop()`` drains."""

    def __init__(self, settings: HashdSettings) -> None:
        self.settings = settings
        self.pool = db.make_pool(settings.database, name="hashd")
        callers = CallerResolver(settings.identity_secret, settings.admin_token)
        metrics.watch_pool(self.pool)
        # Receive up to twice the unary limit, so a caller a little over it gets HashService's
        # "use HashStream" status instead of gRPC's bare "message larger than max".
        self.grpc = GrpcServer(
            settings.listen,
            max_message_bytes=2 * settings.max_message_bytes,
            # Metrics first (it sees every status); then who the caller is, before any handler.
            interceptors=[
                metrics.MetricsInterceptor(),
                IdentityInterceptor(callers),
            ],
            tls=settings.tls,
        )
        self.metrics: metrics.MetricsServer | None = None
        self._queue_depth: asyncio.Task[None] | None = None
        self.executor = BoundedExecutor(settings.cpu_workers, settings.cpu_queue)
        table = PostgresCacheTable(self.pool, dsn=settings.database.require_dsn())
        self.cache = ResultCache(table, settings.cache)
        self.grpc.add(
            add_hash_service,
            hash_pb2.DESCRIPTOR.services_by_name["HashService"].full_name,
            HashService(
                self.executor,
                self.cache,
                max_input_bytes=settings.max_message_bytes,
                callers=callers,
                argon2_memory_kib=settings.argon2_memory_limit_kib,
            ),
        )
        self.grpc.add(
            cache_pb2_grpc.add_CacheServiceServicer_to_server,
            cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name,
            CacheService(self.cache, lambda: self.grpc.address),
        )
        self.task_store = PostgresTaskStore(self.pool, keyring=settings.task_keys)
        # One LISTEN connection fans task status changes out to every WatchTask stream, and
        # carries the cache's clears: PostgreSQL wakes every listening backend at each commit
        # that notifies (three per task), whatever the channel, so a second connection would
        # be woken for nothing but the rare clear.
        self.watch_hub = WatchHub(
            Listener(
                settings.database.require_dsn(),
                [NOTIFY_STATUS, CLEAR_CHANNEL],
                name="hashd-watch",
            ),
            self.task_store,
            side_channels={CLEAR_CHANNEL: self.cache.clear_notices()},
        )
        self.tasks = TaskService(self.task_store, settings, cache=self.cache, hub=self.watch_hub)
        self.grpc.add(
            task_pb2_grpc.add_TaskServiceServicer_to_server,
            task_pb2.DESCRIPTOR.services_by_name["TaskService"].full_name,
            self.tasks,
        )

    async def start(self) -> None:
        dsn = self.settings.database.require_dsn()
        # A database still starting (containers started together) gets HASHMESH_DB_RETRY_*.
        await db.with_retries(
            self.settings.database,
            lambda: asyncio.to_thread(migrations.migrate, dsn),
            what="applying migrations",
        )
        await self.pool.open(wait=False)
        await self.cache.start()
        await self.watch_hub.start()
        await self.grpc.set_serving(False)  # grpc's health servicer starts out SERVING
        await self.grpc.start()
        await self.grpc.set_serving(True)
        if self.settings.metrics_port is not None:
            host = self.settings.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            self.metrics = metrics.start_metrics_server(self.settings.metrics_port, host=host)
            self._queue_depth = asyncio.create_task(
                publish_queue_depth(self.task_store, self.settings.queue_metrics_seconds),
                name="queue-depth-metrics",
            )
        log.info("hashd serving", extra={"address": self.grpc.address})

    async def stop(self) -> None:
        # NOT_SERVING, refuse new calls, let in-flight ones finish within the grace period.
        await self.grpc.stop(self.settings.grace_seconds)
        if self._queue_depth is not None:
            self._queue_depth.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._queue_depth
        if self.metrics is not None:
            self.metrics.close()
        self.executor.shutdown()
        await self.cache.stop()
        await self.watch_hub.stop()
        await self.tasks.limits.stop()
        await self.pool.close()
        metrics.unwatch_pool(self.pool)


async def publish_queue_depth(store: TaskStore, interval: float) -> None:
    """Every ``interval`` seconds, the task counters by status (O(1)) into the queue-depth
    gauge; a failed read keeps the last values (the pool metrics show the trouble)."""
    while True:
        try:
            counts = await store.count_by_status()
            metrics.set_queue_depth({status.value: n for status, n in counts.items()})
        except HashmeshError as exc:
            log.warning("could not read the queue depth", extra={"error": type(exc).__name__})
        await asyncio.sleep(interval)


def _limit_malloc_arenas(arenas: int = 2) -> None:
    """Fewer glibc arenas: gRPC's threads otherwise each keep freed chunk buffers of streams
    (measured: steadier RSS and faster HashStream). A no-op outside glibc."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).mallopt(-8, arenas)  # M_ARENA_MAX


async def run(settings: HashdSettings) -> None:
    _limit_malloc_arenas()
    server = Hashd(settings)
    try:
        await server.start()
    except BaseException:
        # Close what did start (pool, LISTEN connections, executor): left open, the process
        # could hang on its way out instead of reporting why it could not start.
        with contextlib.suppress(Exception):
            await server.stop()
        raise
    print(f"hashd listening on {server.grpc.address}", flush=True)
    if server.metrics is not None:  # after the gRPC line: readers take the first as the address
        print(f"hashd metrics listening on {server.metrics.address}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await server.stop()
