"""The replica set: one channel per hashd replica, its state, and how it changes.

State changes come from three places: active grpc.health.v1 checks (SERVING → ready, anything
else → unhealthy), passive ejection after consecutive connection failures (re-admitted by the
next passing check), and operators (drain). Replicas come from a static list and from DNS
names re-resolved periodically. The picker reads ``ready``, a tuple rebuilt only on change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Collection
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.balancer.config import BalancerSettings
from hashmesh.balancer.pickers import Candidate, Picker, make_picker
from hashmesh.balancer.stats import ReplicaStats
from hashmesh.core.metrics import mesh_method_names

log = logging.getLogger(__name__)

READY = "ready"
UNHEALTHY = "unhealthy"
EJECTED = "ejected"
DRAINING = "draining"
UNHEALTHY_AFTER = 2  # failed health checks in a row (NOT_SERVING: at once)
KNOWN_METHODS = mesh_method_names()


def channel_options(settings: BalancerSettings) -> list[tuple[str, Any]]:
    return [
        ("grpc.max_receive_message_length", settings.wire_message_bytes),
        ("grpc.max_send_message_length", settings.wire_message_bytes),
        # The balancer retries by itself, within its budget.
        ("grpc.enable_retries", 0),
        # A restarted replica is noticed quickly; health checks pace the rest.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        # Each replica gets its own connection even if two names resolve alike.
        ("grpc.use_local_subchannel_pool", 1),
    ]


class Replica:
    """One hashd replica: its channel, cached multicallables and counters."""

    __slots__ = (
        "_calls",
        "_failed_over",
        "address",
        "attempts",
        "bad_checks",
        "cap",
        "channel",
        "draining",
        "failures",
        "in_flight",
        "removed",
        "source",
        "state",
        "state_since",
        "stats",
        "stream_cap",
        "streams",
    )

    def __init__(
        self,
        address: str,
        source: str,
        settings: BalancerSettings,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.address = address
        self.source = source
        # One channel carries both the forwarded calls and the health checks, so a check
        # proves what calls will use: the same TLS session, the same connection.
        options = channel_options(settings)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            tls_options = settings.upstream_tls.channel_options() if settings.upstream_tls else []
            self.channel = grpc.aio.secure_channel(
                address, credentials, options=[*options, *tls_options]
            )
        self.state = UNHEALTHY
        self.state_since = time.monotonic()
        self.draining = False
        self.removed = False
        self.in_flight = 0
        self.cap = settings.max_in_flight_per_backend
        # Streams hold their slot for as long as the client likes: a separate count and cap,
        # so they can never take the slots of unary calls.
        self.streams = 0
        self.stream_cap = settings.max_streams_per_backend
        self.failures = 0
        self.bad_checks = 0
        self.stats = ReplicaStats(settings.stats_window)
        self._calls: dict[tuple[str, str], Any] = {}
        # Attempts of idempotent unary calls in flight here: cancelled and retried elsewhere
        # when this replica goes down (``fail_over``).
        self.attempts: set[Any] = set()
        self._failed_over: set[Any] = set()

    def fail_over(self) -> None:
        for rpc in self.attempts:
            if rpc.cancel():
                self._failed_over.add(rpc)
        self.attempts.clear()

    def was_failed_over(self, rpc: Any) -> bool:
        """``rpc`` ended because ``fail_over`` cancelled it (asked once per attempt)."""
        if rpc in self._failed_over:
            self._failed_over.discard(rpc)
            return True
        return False

    @property
    def ewma(self) -> float:
        return self.stats.ewma

    @property
    def has_room(self) -> bool:
        return self.in_flight < self.cap

    @property
    def shown_state(self) -> str:
        return DRAINING if self.draining and self.state == READY else self.state

    def multicallable(self, kind: str, method: str) -> Any:
        """``channel.unary_unary(method)`` and friends, made once per method of the mesh: no
        serializers, so bytes pass through untouched. Other names are the client's choice:
        made per call and never registered with the channel (gRPC keeps a registered method
        for the channel's life), so inventing names cannot grow memory."""
        key = (kind, method)
        found = self._calls.get(key)
        if found is None:
            if method not in KNOWN_METHODS:
                return getattr(self.channel, kind)(method)
            found = self._calls[key] = getattr(self.channel, kind)(method, _registered_method=True)
        return found

    def __repr__(self) -> str:
        return f"Replica({self.address}, {self.shown_state})"


class BackendSet:
    """Every known replica, the picker in force, and the loops that keep states current."""

    def __init__(
        self, settings: BalancerSettings, on_change: Callable[[bool], Any] | None = None
    ) -> None:
        self.settings = settings
        self.replicas: dict[str, Replica] = {}
        self.ready: tuple[Replica, ...] = ()
        self.fallback: tuple[Replica, ...] = ()
        self.picker: Picker = make_picker(settings.strategy, settings.hash_key)
        self.hash_key: str = settings.hash_key
        # Drained by an operator, by address: also applies to a replica DNS finds later.
        self.drained: set[str] = set()
        self._on_change = on_change
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._side: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._serving: bool | None = None
        # Given to ``start`` (read at the edge, once): replicas DNS finds later use them too.
        self._credentials: grpc.ChannelCredentials | None = None

    # -- picking ---------------------------------------------------------------------------

    def pick(self, key: str | None, exclude: Collection[Replica]) -> Replica | None:
        # Panic routing (as Envoy does): with no replica known healthy, try them all rather
        # than refuse; the dead ones fail fast and the call is retried on another.
        chosen: Candidate | None = self.picker.pick(self.ready or self.fallback, key, exclude)
        return chosen  # type: ignore[return-value]

    def pick_stream(self, key: str | None, exclude: Collection[Replica]) -> Replica | None:
        """``pick`` for a stream: replicas at their stream cap are left out as well."""
        candidates = self.ready or self.fallback
        full = [r for r in candidates if r.streams >= r.stream_cap]
        if full:
            exclude = [*exclude, *full]
        chosen: Candidate | None = self.picker.pick(candidates, key, exclude)
        return chosen  # type: ignore[return-value]

    def set_strategy(self, name: str, hash_key: str | None = None) -> None:
        """Swap the picker; calls in flight already hold their replica and are not touched."""
        self.hash_key = (hash_key or self.settings.hash_key).lower()
        self.picker = make_picker(name, self.hash_key)
        log.info("strategy changed", extra={"strategy": name, "hash_key": self.hash_key})

    # -- state -----------------------------------------------------------------------------

    def _rebuild(self) -> None:
        self.fallback = tuple(r for r in self.replicas.values() if not r.draining and not r.removed)
        self.ready = tuple(r for r in self.fallback if r.state == READY)
        serving = any(r.state == READY and not r.removed for r in self.replicas.values())
        if serving != self._serving:
            self._serving = serving
            if self._on_change is not None:
                self._on_change(serving)

    def _set_state(self, replica: Replica, state: str) -> None:
        if replica.state == state:
            return
        log.info(
            "replica state", extra={"replica": replica.address, "from": replica.state, "to": state}
        )
        if replica.state == READY and state in (UNHEALTHY, EJECTED):
            replica.fail_over()
        replica.state = state
        replica.state_since = time.monotonic()
        if state == READY:
            replica.failures = 0
        self._rebuild()

    def connection_failed(self, replica: Replica) -> None:
        """Passive outlier detection: eject after ``eject_after`` failures in a row."""
        replica.failures += 1
        if replica.failures >= self.settings.eject_after and replica.state == READY:
            replica.stats.ejections += 1
            self._set_state(replica, EJECTED)

    def drain(self, address: str, undrain: bool = False) -> Replica:
        replica = self.replicas[address]
        self.drain_address(address, undrain)
        return replica

    def drain_address(self, address: str, undrain: bool = False) -> None:
        """Drain (or undrain) ``address``, known yet or not."""
        if undrain:
            self.drained.discard(address)
        else:
            self.drained.add(address)
        replica = self.replicas.get(address)
        if replica is not None:
            replica.draining = not undrain
            self._rebuild()
        log.info("replica drain", extra={"replica": address, "draining": not undrain})

    def add(self, address: str, source: str) -> Replica:
        replica = self.replicas.get(address)
        if replica is not None:
            return replica
        replica = self.replicas[address] = Replica(
            address, source, self.settings, self._credentials
        )
        replica.draining = address in self.drained
        self._tasks[address] = asyncio.create_task(
            self._health_loop(replica), name=f"health {address}"
        )
        return replica

    async def remove(self, address: str) -> None:
        """Stop picking ``address``; close its channel once its calls in flight are done."""
        replica = self.replicas.get(address)
        if replica is None:
            return
        replica.removed = True
        self._rebuild()
        task = self._tasks.pop(address, None)
        if task is not None:
            task.cancel()
        deadline = time.monotonic() + self.settings.grace_seconds
        while (replica.in_flight or replica.streams) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self.replicas.pop(address, None)
        await replica.channel.close()

    # -- loops -----------------------------------------------------------------------------

    async def check(self, replica: Replica) -> None:
        # types-grpcio-health-checking declares HealthStub without its methods.
        check: grpc.aio.UnaryUnaryMultiCallable[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = health_pb2_grpc.HealthStub(replica.channel).Check  # type: ignore[attr-defined]
        try:
            reply = await check(
                health_pb2.HealthCheckRequest(), timeout=self.settings.health_timeout
            )
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
            replica.bad_checks = 0 if healthy else UNHEALTHY_AFTER  # NOT_SERVING counts at once
        except grpc.aio.AioRpcError:
            # One slow or lost check on a busy machine is not a verdict.
            replica.bad_checks += 1
            healthy = False
        if healthy:
            ejected_long_enough = (
                time.monotonic() - replica.state_since >= self.settings.health_interval
            )
            if replica.state != EJECTED or ejected_long_enough:
                self._set_state(replica, READY)
        elif replica.state == READY and replica.bad_checks >= UNHEALTHY_AFTER:
            self._set_state(replica, UNHEALTHY)

    async def _health_loop(self, replica: Replica) -> None:
        while not self._stopping.is_set():
            await self.check(replica)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.health_interval)

    async def _resolve(self, entry: str) -> set[str]:
        name, _, port = entry.rpartition(":")
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(name, int(port), type=socket.SOCK_STREAM)
        found = set()
        for family, _, _, _, sockaddr in infos:
            host = str(sockaddr[0])
            found.add(f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}")
        return found

    async def refresh_dns(self) -> None:
        wanted: set[str] = set()
        for entry in self.settings.backends_dns:
            try:
                wanted |= await self._resolve(entry)
            except (OSError, ValueError) as exc:
                # Keep what we had: a DNS hiccup must not empty the mesh.
                log.warning("DNS resolution failed", extra={"name": entry, "error": str(exc)})
                return
        for address in wanted:
            self.add(address, "dns")
        for address, replica in list(self.replicas.items()):
            if replica.source == "dns" and address not in wanted:
                self._side.append(asyncio.create_task(self.remove(address)))

    async def _dns_loop(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self.settings.dns_interval)
            if not self._stopping.is_set():
                await self.refresh_dns()

    async def start(self, credentials: grpc.ChannelCredentials | None = None) -> None:
        """Add the static replicas, resolve DNS once and run one health check of each, so the
        balancer is useful as soon as it says it listens. ``credentials`` dial the replicas
        (required when ``settings.upstream_tls`` is set: a missing one is never plaintext)."""
        if self.settings.upstream_tls is not None and credentials is None:
            raise ValueError("upstream TLS is configured: start() needs its credentials")
        self._credentials = credentials
        for address in self.settings.backends:
            self.add(address, "static")
        if self.settings.backends_dns:
            await self.refresh_dns()
            self._side.append(asyncio.create_task(self._dns_loop(), name="dns"))
        await asyncio.gather(*(self.check(r) for r in list(self.replicas.values())))
        self._rebuild()

    async def stop(self) -> None:
        self._stopping.set()
        tasks = [*self._tasks.values(), *self._side]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(
            *(r.channel.close() for r in self.replicas.values()), return_exceptions=True
        )
