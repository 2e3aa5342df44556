"""Wiring of one balancer: replica set, limiter, interceptors, the two listeners, lifecycle.

The public listener (grpcio's synchronous server taking the same grpc.aio handlers,
``balancer.sync_server``, or grpc.aio's with ``settings.server == "aio"``) has no grpc.aio
interceptors (they would add a layer to every forwarded call): it serves the balancer's own
grpc.health.v1, AdminService behind ``AdminPolicy``, and forwards everything else. Server
reflection (v1 and v1alpha, from the contract's descriptor set, comments included) is
answered by the balancer itself, like health: neither is forwarded nor rate limited, so a
client over its limit can still list and describe the services. The admin listener is a
``GrpcServer`` with its own health, reflection (AdminService, Health) and AdminService behind
``AdminAuth``.

Both listeners serve TLS (mutual TLS with a client CA) when ``settings.tls`` is set; the
replicas are dialled with ``settings.upstream_tls``. With ``settings.metrics_port`` set, a
Prometheus endpoint on the host of ``listen`` exports ``snapshot()`` at scrape time and the
proxy counts calls by method and code (``balancer.metrics``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.balancer import collector
from hashmesh.balancer.admin import AdminServicer, admin_handlers, snapshot
from hashmesh.balancer.backends import BackendSet
from hashmesh.balancer.config import BalancerSettings, upstream_credentials
from hashmesh.balancer.connections import admin_options, public_options, raise_fd_limit
from hashmesh.balancer.interceptors import AdminAuth, AdminPolicy, build_chain
from hashmesh.balancer.keys import ApiKeys
from hashmesh.balancer.metrics import CallMetrics, reading, watch_shared_limit
from hashmesh.balancer.proxy import Proxy, Router
from hashmesh.balancer.ratelimit import RateLimiter
from hashmesh.balancer.shared_limit import SharedLimit
from hashmesh.balancer.state import StateFile, capture, restore
from hashmesh.balancer.stats import BalancerStats, Snapshot
from hashmesh.balancer.sync_server import SyncListener
from hashmesh.core import metrics
from hashmesh.core.reflection import HEALTH, add_reflection
from hashmesh.core.rpc import LIVENESS_SERVICE, GrpcServer, Health, server_options
from hashmesh.core.signals import wait_for_signal
from hashmesh.v1 import admin_pb2, admin_pb2_grpc

log = logging.getLogger(__name__)

# Health names answered by the public listener besides "" (the whole balancer).
PROXIED_SERVICES = (
    "hashmesh.v1.HashService",
    "hashmesh.v1.TaskService",
    "hashmesh.v1.CacheService",
)
ADMIN_SERVICE = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
KEYS_RELOAD_SECONDS = 5.0


class Balancer:
    """``start()`` checks the replicas once and opens both listeners; ``stop()`` drains."""

    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self.stats = BalancerStats()
        shared = (
            SharedLimit.from_url(
                settings.redis_url,
                timeout=settings.redis_timeout,
                lease_seconds=settings.redis_lease_seconds,
                table_size=settings.limiter_table_size,
            )
            if settings.redis_url
            else None
        )
        self.limiter = RateLimiter(
            settings.rate_limit,
            settings.rate_limit_overrides,
            table_size=settings.limiter_table_size,
            shared=shared,
        )
        self.keys = ApiKeys(settings.api_keys_file) if settings.api_keys_file else None
        self.backends = BackendSet(settings, on_change=self._serving_changed)
        # Per-call metrics only when something will read them.
        call_metrics = CallMetrics() if settings.metrics_port is not None else None
        chain = build_chain(
            self.keys,
            self.limiter,
            self.stats,
            trusted_proxies=settings.trusted_proxies,
            admin_token=settings.admin_token,
            identity_secret=settings.identity_secret,
            ratelimit_headers=settings.ratelimit_headers,
        )
        self.proxy = Proxy(settings, self.backends, chain, self.stats, call_metrics)
        self.state_file = StateFile(settings.state_file) if settings.state_file else None
        admin = AdminServicer(
            self.stats,
            self.backends,
            self.limiter,
            self.proxy.budgets,
            self._save_state if self.state_file is not None else None,
        )

        self.health = Health()
        # Descriptors first: the connection cap is fitted to what the process may open.
        self.connections = settings.connections.fitted(raise_fd_limit())
        options = [*server_options(settings.wire_message_bytes), *public_options(self.connections)]
        if settings.reuse_port:
            options = [(key, 1 if key == "grpc.so_reuseport" else value) for key, value in options]
        # The public listener: grpcio's synchronous server bridged to this loop (the default),
        # or grpc.aio's; both take the same grpc.aio handlers.
        self.server: grpc.aio.Server | SyncListener = (
            SyncListener(options, settings.budgets)
            if settings.server == "sync"
            else grpc.aio.server(options=options)
        )
        health_pb2_grpc.add_HealthServicer_to_server(
            self.health, cast(grpc.aio.Server, self.server)
        )
        # Answered here, before the Router: reflection and health are never rate limited.
        add_reflection(
            cast(grpc.aio.Server, self.server), [*PROXIED_SERVICES, ADMIN_SERVICE, HEALTH]
        )
        public_policy = AdminPolicy(settings.admin_token, open_without_token=False)
        self.server.add_generic_rpc_handlers(
            [Router(self.proxy, admin_handlers(admin), public_policy)]
        )
        self.port = 0

        # AdminAuth first: a call without the admin token is refused before anything else
        # runs (MetricsInterceptor runs the rest of the chain on every call either way).
        admin_interceptors: list[grpc.aio.ServerInterceptor] = [
            AdminAuth(AdminPolicy(settings.admin_token, open_without_token=True))
        ]
        if settings.metrics_port is not None:
            admin_interceptors.append(metrics.MetricsInterceptor())
        self.admin = GrpcServer(
            settings.admin_listen,
            interceptors=admin_interceptors,
            tls=settings.tls,
            extra_options=admin_options(),
            tunnel_socket=False,
        )
        self.admin.add(admin_pb2_grpc.add_AdminServiceServicer_to_server, ADMIN_SERVICE, admin)
        self._side: list[asyncio.Task[None]] = []
        self.metrics: metrics.MetricsServer | None = None

    def snapshot(self, top_peers: int = 10, *, percentiles: bool = True) -> Snapshot:
        """Every counter at once, for a metrics exporter."""
        return snapshot(
            self.stats,
            self.backends,
            self.limiter,
            self.proxy.budgets,
            top_peers,
            percentiles=percentiles,
        )

    def metrics_reading(self) -> collector.BalancerReading:
        """What /metrics exports; runs on the scrape thread, so no sorting (no percentiles,
        no top peers): only plain attributes are copied."""
        return reading(self.snapshot(0, percentiles=False))

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rsplit(':', 1)[0]}:{self.port}"

    def _serving_changed(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        log.info("balancer health", extra={"serving": serving})
        for name in ("", *PROXIED_SERVICES):
            self._side.append(asyncio.create_task(self.health.set(name, status)))
        self._side.append(asyncio.create_task(self.admin.set_serving(serving)))

    async def _reload_keys(self) -> None:
        assert self.keys is not None
        while True:
            await asyncio.sleep(KEYS_RELOAD_SECONDS)
            try:
                self.keys.reload_if_changed()
            except ValueError as exc:  # a broken edit keeps the keys loaded before it
                log.error("API keys file rejected", extra={"error": str(exc)})

    async def _save_state(self) -> None:
        assert self.state_file is not None
        await asyncio.to_thread(self.state_file.save, capture(self.backends, self.limiter))

    async def start(self) -> None:
        for name in ("", *PROXIED_SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        if self.state_file is not None:  # before any replica takes a call: drains hold at once
            saved = self.state_file.load()
            if saved is not None:
                restore(saved, self.backends, self.limiter)
                log.info("admin state restored", extra={"path": str(self.state_file.path)})
        # The certificate files are read here, once, at start (never in a constructor).
        upstream = self.settings.upstream_tls
        await self.backends.start(upstream_credentials(upstream) if upstream is not None else None)
        tls = self.settings.tls
        try:
            if tls is not None:
                self.port = self.server.add_secure_port(self.settings.listen, tls.credentials())
            else:
                self.port = self.server.add_insecure_port(self.settings.listen)
        except RuntimeError:  # grpc raises for an address it cannot parse or bind
            self.port = 0
        if not self.port:
            raise OSError(f"cannot listen on {self.settings.listen}")
        await self.server.start()
        await self.admin.start()
        if self.settings.metrics_port is not None:
            host = self.settings.listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
            collector.watch_balancer(self.metrics_reading)
            watch_shared_limit(self.limiter)
            self.metrics = metrics.start_metrics_server(self.settings.metrics_port, host=host)
        if self.keys is not None:
            self._side.append(asyncio.create_task(self._reload_keys(), name="keys"))

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.admin.stop(0)
        await self.server.stop(self.settings.grace_seconds)
        if self.metrics is not None:  # scraped until the calls in flight are done
            self.metrics.close()
            collector.watch_balancer(None)
            watch_shared_limit(None)
        self.proxy.close()
        await self.backends.stop()
        if self.limiter.shared is not None:
            await self.limiter.shared.close()
        for task in self._side:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._side, return_exceptions=True)


async def run(settings: BalancerSettings) -> None:
    balancer = Balancer(settings)
    await balancer.start()
    print(f"balancer listening on {balancer.address}", flush=True)
    print(f"balancer admin listening on {balancer.admin.address}", flush=True)
    if balancer.metrics is not None:  # last: readers wait for the two lines above
        print(f"balancer metrics listening on {balancer.metrics.address}", flush=True)
    try:
        await wait_for_signal()
    finally:
        await balancer.stop()
