"""AdminService: reading the balancer's stats and changing its strategy, limits and drains.

Who may call it is decided before these methods run (``interceptors.AdminPolicy``)."""

from __future__ import annotations

import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from google.protobuf import duration_pb2

from hashmesh.balancer.backends import BackendSet, Replica
from hashmesh.balancer.budgets import Budgets, BudgetSnapshot, PeerHolding
from hashmesh.balancer.config import MAX_RATE, MIN_RATE, RateLimitSettings, is_hash_key
from hashmesh.balancer.ratelimit import RateLimiter
from hashmesh.balancer.stats import BalancerStats, ReplicaSnapshot, Snapshot
from hashmesh.core.errors import HashmeshError, InvalidArgument, NotFound, Violations
from hashmesh.core.handlers import Context, Handler
from hashmesh.core.rpc import abort_with
from hashmesh.v1 import admin_pb2, admin_pb2_grpc

STRATEGY_TO_PROTO = {
    "round_robin": admin_pb2.STRATEGY_ROUND_ROBIN,
    "least_connections": admin_pb2.STRATEGY_LEAST_CONNECTIONS,
    "p2c_ewma": admin_pb2.STRATEGY_P2C_EWMA,
    "consistent_hash": admin_pb2.STRATEGY_CONSISTENT_HASH,
}
PROTO_TO_STRATEGY = {v: k for k, v in STRATEGY_TO_PROTO.items()}
STATE_TO_PROTO = {
    "ready": admin_pb2.BACKEND_STATE_READY,
    "unhealthy": admin_pb2.BACKEND_STATE_UNHEALTHY,
    "ejected": admin_pb2.BACKEND_STATE_EJECTED,
    "draining": admin_pb2.BACKEND_STATE_DRAINING,
}

Reply = TypeVar("Reply")
MAX_CLIENT_ID_LENGTH = 200
"""As hashd's TaskService: a longer id cannot be a client of the mesh."""
MAX_TOP_PEERS = 1000
"""GetStats lists at most this many refused peers, and as many holding peers (larger asks
are capped, AIP-158 style)."""


def snapshot(
    stats: BalancerStats,
    backends: BackendSet,
    limiter: RateLimiter,
    budgets: Budgets,
    top: int = 10,
    *,
    percentiles: bool = True,
) -> Snapshot:
    """Every counter at once: what GetStats and a metrics exporter read. The exporter asks
    for ``top=0, percentiles=False``: it runs on the scrape thread and must not sort."""
    replicas = [replica_snapshot(r, percentiles) for r in list(backends.replicas.values())]
    return Snapshot(
        calls=stats.calls,
        retries=stats.retries,
        no_backend=stats.no_backend,
        rate_limited=limiter.refused_total,
        uptime=time.monotonic() - stats.started,
        strategy=backends.picker.name,
        replicas=replicas,
        top_refused=limiter.top_refused(top) if top > 0 else [],
        unauthenticated=stats.unauthenticated,
        budgets=budgets.snapshot(top),
    )


def replica_snapshot(replica: Replica, percentiles: bool = True) -> ReplicaSnapshot:
    latencies = replica.stats.latencies
    return ReplicaSnapshot(
        address=replica.address,
        source=replica.source,
        state=replica.shown_state,
        in_flight=replica.in_flight + replica.streams,
        calls=replica.stats.calls,
        errors=replica.stats.errors,
        ejections=replica.stats.ejections,
        p50=latencies.percentile(0.5) if percentiles else 0.0,
        p99=latencies.percentile(0.99) if percentiles else 0.0,
        ewma=replica.stats.ewma,
    )


def _duration(seconds: float) -> duration_pb2.Duration:
    value = duration_pb2.Duration()
    value.FromNanoseconds(int(seconds * 1e9))
    return value


def backend_proto(snap: ReplicaSnapshot) -> admin_pb2.Backend:
    return admin_pb2.Backend(
        address=snap.address,
        state=STATE_TO_PROTO[snap.state],
        in_flight=snap.in_flight,
        calls=snap.calls,
        errors=snap.errors,
        latency_p50=_duration(snap.p50),
        latency_p99=_duration(snap.p99),
        ejections=snap.ejections,
        latency_ewma=_duration(snap.ewma),
        source=snap.source,
    )


def _budget_use(in_use: int, total_limit: int, peer_limit: int) -> admin_pb2.BudgetUse:
    return admin_pb2.BudgetUse(in_use=in_use, total_limit=total_limit, peer_limit=peer_limit)


def budgets_proto(snap: BudgetSnapshot) -> admin_pb2.BudgetsInUse:
    limits = snap.limits
    kinds = zip(snap.in_use, limits.total_caps, limits.peer_caps, strict=True)
    unary, upload, watch, other = (_budget_use(*kind) for kind in kinds)
    return admin_pb2.BudgetsInUse(
        unary_calls=unary,
        upload_streams=upload,
        watch_streams=watch,
        other_streams=other,
        request_bytes=_budget_use(snap.bytes, limits.total_bytes, limits.peer_bytes),
    )


def holding_proto(holding: PeerHolding) -> admin_pb2.PeerHoldings:
    unary, upload, watch, other = holding.counts
    return admin_pb2.PeerHoldings(
        peer=holding.peer,
        unary_calls=unary,
        upload_streams=upload,
        watch_streams=watch,
        other_streams=other,
        request_bytes=holding.bytes,
    )


def _edge(
    method: Callable[[Any, Any, Context], Awaitable[Reply]],
) -> Callable[[Any, Any, Context], Awaitable[Reply]]:
    """Domain errors → status here too: on the public listener no ErrorInterceptor runs."""

    @functools.wraps(method)
    async def wrapped(self: Any, request: Any, context: Context) -> Reply:
        try:
            return await method(self, request, context)
        except HashmeshError as error:
            await abort_with(context, error)
            raise

    return wrapped


def _limit_from_proto(field: str, limit: admin_pb2.RateLimit) -> RateLimitSettings:
    if not MIN_RATE <= limit.rate_per_second <= MAX_RATE:
        raise InvalidArgument(
            f"{field}.rate_per_second",
            f"must be between {MIN_RATE:g} and {MAX_RATE:g}, got {limit.rate_per_second:g}",
        )
    if limit.burst < 0:
        raise InvalidArgument(f"{field}.burst", f"must not be negative, got {limit.burst}")
    return RateLimitSettings(limit.rate_per_second, limit.burst)


def _limit_proto(spec: RateLimitSettings) -> admin_pb2.RateLimit:
    return admin_pb2.RateLimit(rate_per_second=spec.rate, burst=spec.burst)


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        stats: BalancerStats,
        backends: BackendSet,
        limiter: RateLimiter,
        budgets: Budgets,
        changed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._stats = stats
        self._backends = backends
        self._limiter = limiter
        self._budgets = budgets
        self._changed = changed

    async def _saved(self) -> None:
        """After a change: keep it (``balancer.state``) before answering."""
        if self._changed is not None:
            await self._changed()

    @_edge
    async def GetStats(
        self, request: admin_pb2.GetStatsRequest, context: Context
    ) -> admin_pb2.GetStatsResponse:
        if request.top_peers < 0:
            raise InvalidArgument("top_peers", f"must not be negative, got {request.top_peers}")
        top = min(request.top_peers or 10, MAX_TOP_PEERS)
        snap = snapshot(self._stats, self._backends, self._limiter, self._budgets, top)
        held = snap.budgets
        assert held is not None  # always read here
        return admin_pb2.GetStatsResponse(
            backends=[backend_proto(r) for r in snap.replicas],
            top_refused_peers=[
                admin_pb2.PeerRefusals(peer=p, refusals=n) for p, n in snap.top_refused
            ],
            calls=snap.calls,
            rate_limited=snap.rate_limited,
            retries=snap.retries,
            no_backend=snap.no_backend,
            strategy=STRATEGY_TO_PROTO[snap.strategy],
            uptime=_duration(snap.uptime),
            budgets=budgets_proto(held) if held.enabled else None,
            top_holding_peers=[holding_proto(h) for h in held.top],
            over_budget=held.refused,
        )

    @_edge
    async def ListBackends(
        self, request: admin_pb2.ListBackendsRequest, context: Context
    ) -> admin_pb2.ListBackendsResponse:
        return admin_pb2.ListBackendsResponse(
            backends=[backend_proto(replica_snapshot(r)) for r in self._backends.replicas.values()]
        )

    def _strategy(self) -> tuple[int, str]:
        name = self._backends.picker.name
        return STRATEGY_TO_PROTO[name], self._backends.hash_key if name == "consistent_hash" else ""

    @_edge
    async def GetStrategy(
        self, request: admin_pb2.GetStrategyRequest, context: Context
    ) -> admin_pb2.GetStrategyResponse:
        strategy, key = self._strategy()
        return admin_pb2.GetStrategyResponse(strategy=strategy, hash_key=key)  # type: ignore[arg-type]

    @_edge
    async def SetStrategy(
        self, request: admin_pb2.SetStrategyRequest, context: Context
    ) -> admin_pb2.SetStrategyResponse:
        name = PROTO_TO_STRATEGY.get(request.strategy)
        if name is None:
            raise InvalidArgument("strategy", "is required (one of the STRATEGY_* values)")
        key = request.hash_key.lower()
        if key and not is_hash_key(key):
            raise InvalidArgument(
                "hash_key", "must be a text metadata key: a-z, 0-9, '-', '_', '.' (not -bin, grpc-)"
            )
        self._backends.set_strategy(name, key or None)
        await self._saved()
        strategy, key = self._strategy()
        return admin_pb2.SetStrategyResponse(strategy=strategy, hash_key=key)  # type: ignore[arg-type]

    def _limits(self) -> tuple[admin_pb2.RateLimit | None, list[admin_pb2.ClientRateLimit]]:
        default = _limit_proto(self._limiter.default) if self._limiter.default else None
        overrides = [
            admin_pb2.ClientRateLimit(client_id=client, limit=_limit_proto(spec))
            for client, spec in sorted(self._limiter.overrides.items())
        ]
        return default, overrides

    @_edge
    async def GetRateLimits(
        self, request: admin_pb2.GetRateLimitsRequest, context: Context
    ) -> admin_pb2.GetRateLimitsResponse:
        default, overrides = self._limits()
        return admin_pb2.GetRateLimitsResponse(default_limit=default, overrides=overrides)

    @_edge
    async def SetRateLimits(
        self, request: admin_pb2.SetRateLimitsRequest, context: Context
    ) -> admin_pb2.SetRateLimitsResponse:
        # Every bad field at once (a batch of overrides is fixed in one go).
        violations = Violations()
        has_default = request.HasField("default_limit")
        if request.disable and has_default:
            violations.add("default_limit", "must be unset when disable is true")
        default = None
        if has_default:
            with violations.check():
                default = _limit_from_proto("default_limit", request.default_limit)
        upsert = {}
        for index, item in enumerate(request.upsert_overrides):
            if not item.client_id:
                violations.add(f"upsert_overrides[{index}].client_id", "is required")
            elif len(item.client_id) > MAX_CLIENT_ID_LENGTH:
                violations.add(
                    f"upsert_overrides[{index}].client_id",
                    f"must be at most {MAX_CLIENT_ID_LENGTH} characters",
                )
            with violations.check():
                upsert[item.client_id] = _limit_from_proto(
                    f"upsert_overrides[{index}].limit", item.limit
                )
        violations.raise_if_any()
        self._limiter.configure(
            default=default,
            disable=request.disable,
            upsert=upsert,
            remove=tuple(request.remove_overrides),
        )
        await self._saved()
        new_default, overrides = self._limits()
        return admin_pb2.SetRateLimitsResponse(default_limit=new_default, overrides=overrides)

    @_edge
    async def DrainBackend(
        self, request: admin_pb2.DrainBackendRequest, context: Context
    ) -> admin_pb2.DrainBackendResponse:
        if not request.address:
            raise InvalidArgument("address", "is required")
        if request.address not in self._backends.replicas:
            raise NotFound(
                f"no replica {request.address!r}; see ListBackends",
                reason="BACKEND_NOT_FOUND",
                resource_type="hashmesh.v1.Backend",
                resource_name=request.address,
            )
        replica = self._backends.drain(request.address, request.undrain)
        await self._saved()
        return admin_pb2.DrainBackendResponse(backend=backend_proto(replica_snapshot(replica)))


class _Capture:
    """Stands in for a server to collect a generated ``add_*_to_server``'s handlers."""

    def __init__(self) -> None:
        self.handlers: dict[str, Handler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Handler]) -> None:
        self.handlers.update(handlers)


def admin_handlers(servicer: AdminServicer) -> dict[str, Handler]:
    """AdminService's handlers by method name, for the public listener's router."""
    capture = _Capture()
    # A _Capture is no grpc server, but has the one method the generated function calls.
    admin_pb2_grpc.add_AdminServiceServicer_to_server(servicer, capture)  # type: ignore[arg-type]
    return capture.handlers
