"""``hashctl lb``, ``ratelimit``, ``cache``, ``health`` and ``db``: operating the mesh."""

from __future__ import annotations

import os
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import duration_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hashmesh.cli.cache_stats import merge as merge_cache_stats
from hashmesh.cli.client import CliError, ExitCode, open_channel, rpc_errors
from hashmesh.cli.naming import (
    STRATEGIES,
    algorithm_name,
    backend_state_name,
    parse_strategy,
    strategy_name,
)
from hashmesh.cli.options import JsonFlag
from hashmesh.cli.state import CliState, state_of
from hashmesh.v1 import admin_pb2, cache_pb2, cache_pb2_grpc

lb_app = typer.Typer(help="The balancer's AdminService (on --admin-target).", no_args_is_help=True)
ratelimit_app = typer.Typer(
    help="Per-client rate limits of the balancer (on --admin-target).", no_args_is_help=True
)
cache_app = typer.Typer(help="The hashd result cache.", no_args_is_help=True)
db_app = typer.Typer(help="The PostgreSQL schema.", no_args_is_help=True)


def _ms(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e6


def backend_dict(backend: admin_pb2.Backend) -> dict[str, Any]:
    return {
        "address": backend.address,
        "state": backend_state_name(backend.state),
        "in_flight": backend.in_flight,
        "calls": backend.calls,
        "errors": backend.errors,
        "latency_p50_ms": _ms(backend.latency_p50),
        "latency_p99_ms": _ms(backend.latency_p99),
        "latency_ewma_ms": _ms(backend.latency_ewma),
        "ejections": backend.ejections,
        "source": backend.source,
    }


BUDGET_KINDS = ("unary_calls", "upload_streams", "watch_streams", "other_streams", "request_bytes")
"""The budgets GetStats reports, as its ``BudgetsInUse`` and ``PeerHoldings`` name them."""


def budgets_dict(reply: admin_pb2.GetStatsResponse) -> dict[str, Any] | None:
    """Each budget held now with its limits; ``None`` while the balancer's budgets are off."""
    if not reply.HasField("budgets"):
        return None
    uses = {kind: getattr(reply.budgets, kind) for kind in BUDGET_KINDS}
    return {
        kind: {"in_use": u.in_use, "total_limit": u.total_limit, "peer_limit": u.peer_limit}
        for kind, u in uses.items()
    }


def holding_dict(holding: admin_pb2.PeerHoldings) -> dict[str, Any]:
    return {"peer": holding.peer} | {kind: getattr(holding, kind) for kind in BUDGET_KINDS}


def _backend_table(backends: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    columns = ["ADDRESS", "STATE", "IN FLIGHT", "CALLS", "ERRORS", "P50 MS", "P99 MS", "EJECTIONS"]
    rows = [
        [
            b["address"],
            b["state"],
            b["in_flight"],
            b["calls"],
            b["errors"],
            b["latency_p50_ms"],
            b["latency_p99_ms"],
            b["ejections"],
        ]
        for b in backends
    ]
    return columns, rows


@lb_app.command("stats")
def lb_stats(
    ctx: typer.Context,
    top: Annotated[
        int, typer.Option(help="How many most-refused and most-holding peers to list.", min=0)
    ] = 10,
    json_out: JsonFlag = False,
) -> None:
    """Balancer counters: calls, refusals, retries, per-replica figures, budgets in use and
    the peers holding the most.

    Example:

      hashctl lb stats --top 5
    """
    state = state_of(ctx)
    out = state.output(json_out)
    with rpc_errors(state.options.admin_target):
        reply = state.session.admin().GetStats(
            admin_pb2.GetStatsRequest(top_peers=top),
            timeout=state.options.timeout,
            metadata=state.session.admin_metadata(),
        )
    data: dict[str, Any] = {
        "calls": reply.calls,
        "rate_limited": reply.rate_limited,
        "retries": reply.retries,
        "no_backend": reply.no_backend,
        "strategy": strategy_name(reply.strategy),
        "uptime_seconds": reply.uptime.ToNanoseconds() / 1e9,
        "backends": [backend_dict(b) for b in reply.backends],
        "top_refused_peers": [
            {"peer": p.peer, "refusals": p.refusals} for p in reply.top_refused_peers
        ],
        "over_budget": reply.over_budget,
        "budgets": budgets_dict(reply),
        "top_holding_peers": [holding_dict(h) for h in reply.top_holding_peers],
    }
    lists = ("backends", "top_refused_peers", "budgets", "top_holding_peers")
    if out.json_mode:
        out.json(data)
        return
    out.fields(
        {k: v for k, v in data.items() if k not in lists},
        title="balancer",
    )
    out.table(*_backend_table(data["backends"]))
    if data["top_refused_peers"]:
        out.table(
            ["PEER", "REFUSALS"], [[p["peer"], p["refusals"]] for p in data["top_refused_peers"]]
        )
    if data["budgets"] is not None:
        out.table(
            ["BUDGET", "IN USE", "TOTAL LIMIT", "PEER LIMIT"],
            [[kind, *use.values()] for kind, use in data["budgets"].items()],
        )
    if data["top_holding_peers"]:
        out.table(
            ["PEER", "UNARY", "UPLOAD", "WATCH", "OTHER", "BYTES"],
            [list(h.values()) for h in data["top_holding_peers"]],
        )


@lb_app.command("backends")
def lb_backends(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """List the hashd replicas behind the balancer and their state.

    Example:

      hashctl lb backends --json
    """
    state = state_of(ctx)
    out = state.output(json_out)
    with rpc_errors(state.options.admin_target):
        reply = state.session.admin().ListBackends(
            admin_pb2.ListBackendsRequest(),
            timeout=state.options.timeout,
            metadata=state.session.admin_metadata(),
        )
    backends = [backend_dict(b) for b in reply.backends]
    if out.json_mode:
        out.json({"backends": backends})
    else:
        out.table(*_backend_table(backends))


@lb_app.command("strategy")
def lb_strategy(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(
            help=f"New strategy: {', '.join(STRATEGIES)}. Omit to show the current one."
        ),
    ] = None,
    hash_key: Annotated[
        str | None,
        typer.Option(help="consistent_hash: metadata key to hash (default x-client-id)."),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Show or switch the balancer's picking strategy.

    Examples:

      hashctl lb strategy

      hashctl lb strategy p2c_ewma

      hashctl lb strategy consistent_hash --hash-key x-client-id
    """
    state = state_of(ctx)
    out = state.output(json_out)
    admin = state.session.admin()
    with rpc_errors(state.options.admin_target):
        if name is None:
            reply: Any = admin.GetStrategy(
                admin_pb2.GetStrategyRequest(),
                timeout=state.options.timeout,
                metadata=state.session.admin_metadata(),
            )
        else:
            reply = admin.SetStrategy(
                admin_pb2.SetStrategyRequest(
                    strategy=parse_strategy(name), hash_key=hash_key or ""
                ),
                timeout=state.options.timeout,
                metadata=state.session.admin_metadata(),
            )
    data = {"strategy": strategy_name(reply.strategy), "hash_key": reply.hash_key or None}
    if out.json_mode:
        out.json(data)
    else:
        out.line(
            strategy_name(reply.strategy) + (f" (key {reply.hash_key})" if reply.hash_key else "")
        )


@lb_app.command("drain")
def lb_drain(
    ctx: typer.Context,
    address: Annotated[
        str, typer.Argument(help="Replica address as `hashctl lb backends` shows it.")
    ],
    undrain: Annotated[
        bool, typer.Option("--undrain", help="Resume picking the replica instead.")
    ] = False,
    json_out: JsonFlag = False,
) -> None:
    """Stop new picks of one replica (calls in flight finish), or resume them.

    Examples:

      hashctl lb drain 127.0.0.1:50051

      hashctl lb drain 127.0.0.1:50051 --undrain
    """
    state = state_of(ctx)
    out = state.output(json_out)
    with rpc_errors(state.options.admin_target):
        reply = state.session.admin().DrainBackend(
            admin_pb2.DrainBackendRequest(address=address, undrain=undrain),
            timeout=state.options.timeout,
            metadata=state.session.admin_metadata(),
        )
    data = backend_dict(reply.backend)
    if out.json_mode:
        out.json(data)
    else:
        out.line(f"{data['address']}: {data['state']}")


def _limits_dict(
    reply: admin_pb2.GetRateLimitsResponse | admin_pb2.SetRateLimitsResponse,
) -> dict[str, Any]:
    def limit(value: admin_pb2.RateLimit) -> dict[str, Any]:
        return {"rate_per_second": value.rate_per_second, "burst": value.burst}

    return {
        "default": limit(reply.default_limit) if reply.HasField("default_limit") else None,
        "overrides": [{"client_id": o.client_id, **limit(o.limit)} for o in reply.overrides],
    }


def _show_limits(out: Any, data: dict[str, Any]) -> None:
    if out.json_mode:
        out.json(data)
        return
    default = data["default"]
    rows = [
        ["(default)", default["rate_per_second"], default["burst"]]
        if default
        else ["(default)", "off", "-"]
    ]
    rows += [[o["client_id"], o["rate_per_second"], o["burst"]] for o in data["overrides"]]
    out.table(["CLIENT", "RATE/S", "BURST"], rows)


@ratelimit_app.command("get")
def ratelimit_get(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Show the default per-peer limit and the per-client overrides.

    Example:

      hashctl ratelimit get
    """
    state = state_of(ctx)
    with rpc_errors(state.options.admin_target):
        reply = state.session.admin().GetRateLimits(
            admin_pb2.GetRateLimitsRequest(),
            timeout=state.options.timeout,
            metadata=state.session.admin_metadata(),
        )
    _show_limits(state.output(json_out), _limits_dict(reply))


@ratelimit_app.command("set")
def ratelimit_set(
    ctx: typer.Context,
    rate: Annotated[
        float | None, typer.Option(help="Calls per second (the default, or --client's).")
    ] = None,
    burst: Annotated[
        int, typer.Option(help="Calls allowed at once above the rate (0 = rate).", min=0)
    ] = 0,
    client: Annotated[
        str | None, typer.Option(help="Set an override for this client id instead.")
    ] = None,
    remove: Annotated[
        list[str] | None, typer.Option(help="Remove this client's override (repeatable).")
    ] = None,
    off: Annotated[bool, typer.Option("--off", help="Turn rate limiting off.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Change the default limit, add or remove per-client overrides, or turn limiting off.

    Examples:

      hashctl ratelimit set --rate 100 --burst 200

      hashctl ratelimit set --client batch-job --rate 10

      hashctl ratelimit set --remove batch-job

      hashctl ratelimit set --off
    """
    state = state_of(ctx)
    request = admin_pb2.SetRateLimitsRequest(remove_overrides=remove or [], disable=off)
    if rate is not None:
        if rate <= 0:
            raise CliError("--rate must be positive", ExitCode.INVALID_ARGUMENT)
        limit = admin_pb2.RateLimit(rate_per_second=rate, burst=burst)
        if client:
            request.upsert_overrides.append(
                admin_pb2.ClientRateLimit(client_id=client, limit=limit)
            )
        else:
            request.default_limit.CopyFrom(limit)
    elif client:
        raise CliError("--client needs --rate", ExitCode.USAGE)
    if off and request.HasField("default_limit"):
        raise CliError("--off and a default --rate exclude each other", ExitCode.USAGE)
    if rate is None and not remove and not off:
        raise CliError("nothing to change: give --rate, --remove or --off", ExitCode.USAGE)
    with rpc_errors(state.options.admin_target):
        reply = state.session.admin().SetRateLimits(
            request, timeout=state.options.timeout, metadata=state.session.admin_metadata()
        )
    _show_limits(state.output(json_out), _limits_dict(reply))


@cache_app.command("stats")
def cache_stats(ctx: typer.Context, json_out: JsonFlag = False) -> None:
    """Hit, miss and size figures of the cache tiers, summed over every replica.

    The replicas come from the balancer (--admin-target) and are asked one by one; where
    they cannot be reached from here (or there is no balancer), the figures are those of the
    one replica that took the call, and the output says so.

    Example:

      hashctl cache stats
    """
    state = state_of(ctx)
    out = state.output(json_out)
    by_address, unreachable = _every_replicas_cache_stats(state)
    scope = "partial" if unreachable else "mesh"
    if not by_address:
        scope = "one replica"
        reply = state.session.cache().GetCacheStats(
            cache_pb2.GetCacheStatsRequest(),
            timeout=state.options.timeout,
            metadata=state.session.metadata(),
        )
        # Only an operator is told which replica answered.
        by_address = {reply.replica or f"one behind {state.options.target}": reply}
    replies = list(by_address.values())
    tiers = merge_cache_stats(replies)
    answered = list(by_address)
    cached = [algorithm_name(a) for a in replies[0].cached_algorithms]
    if out.json_mode:
        out.json(
            {
                "scope": scope,
                "replicas": answered,
                "unreachable": unreachable,
                "replica": answered[0],
                "cached_algorithms": cached,
                "tiers": tiers,
            }
        )
        return
    which = {
        "mesh": "every replica",
        "one replica": "this replica only",
        "partial": "some replicas",
    }[scope]
    out.fields(
        {
            "figures of": f"{which}: {', '.join(answered)}",
            **({"not reachable from here": ", ".join(unreachable)} if unreachable else {}),
            "cached algorithms": ", ".join(cached) or "none",
        }
    )
    out.table(
        ["TIER", "HITS", "MISSES", "ENTRIES", "EVICTIONS", "ERRORS"],
        [list(t.values()) for t in tiers],
    )


def _every_replicas_cache_stats(
    state: CliState,
) -> tuple[dict[str, cache_pb2.GetCacheStatsResponse], list[str]]:
    """Each replica's own figures by its address (as the balancer lists it), asked directly,
    and the addresses that could not be reached; ``({}, [])`` when the balancer's admin
    endpoint cannot list them."""
    try:
        listed = state.session.admin().ListBackends(
            admin_pb2.ListBackendsRequest(),
            timeout=state.options.timeout,
            metadata=state.session.admin_metadata(),
        )
    except grpc.RpcError:
        return {}, []
    replies: dict[str, cache_pb2.GetCacheStatsResponse] = {}
    unreachable: list[str] = []
    for backend in listed.backends:
        with open_channel(backend.address, state.options) as channel:
            try:
                replies[backend.address] = cache_pb2_grpc.CacheServiceStub(channel).GetCacheStats(
                    cache_pb2.GetCacheStatsRequest(),
                    timeout=state.options.timeout,
                    metadata=state.session.metadata(),
                )
            except grpc.RpcError:
                unreachable.append(backend.address)
    return replies, unreachable


@cache_app.command("clear")
def cache_clear(
    ctx: typer.Context,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Empty the shared cache and every replica's memory cache.

    Example:

      hashctl cache clear --yes
    """
    state = state_of(ctx)
    out = state.output(json_out)
    if (
        not yes
        and out.interactive
        and not typer.confirm("Clear the result cache of the whole mesh?")
    ):
        raise typer.Exit(ExitCode.OTHER)
    reply = state.session.cache().ClearCache(
        cache_pb2.ClearCacheRequest(),
        timeout=state.options.timeout,
        metadata=state.session.metadata(),
    )
    data = {
        "shared_entries_removed": reply.shared_entries_removed,
        "memory_entries_removed": reply.memory_entries_removed,
    }
    if out.json_mode:
        out.json(data)
    else:
        out.line(
            f"removed {reply.shared_entries_removed} shared and {reply.memory_entries_removed} memory entries"
        )


def health_command(
    ctx: typer.Context,
    service: Annotated[
        str,
        typer.Argument(
            help="Service to check, e.g. hashmesh.v1.HashService; "
            "empty checks the server as a whole."
        ),
    ] = "",
    admin: Annotated[
        bool, typer.Option("--admin", help="Check --admin-target instead of --target.")
    ] = False,
    json_out: JsonFlag = False,
) -> None:
    """Ask grpc.health.v1 whether the target serves; exits 3 unless SERVING.

    Examples:

      hashctl health

      hashctl health hashmesh.v1.TaskService --target 127.0.0.1:50051
    """
    state = state_of(ctx)
    out = state.output(json_out)
    target = state.options.admin_target if admin else state.options.target
    channel = state.session.admin_channel if admin else state.session.channel
    with rpc_errors(target):
        # types-grpcio-health-checking declares HealthStub without its methods.
        check: grpc.UnaryUnaryMultiCallable[
            health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
        ] = health_pb2_grpc.HealthStub(channel).Check  # type: ignore[attr-defined]
        reply = check(health_pb2.HealthCheckRequest(service=service), timeout=state.options.timeout)
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if out.json_mode:
        out.json({"target": target, "service": service, "status": status})
    else:
        out.line(
            f"{target} {service or '(server)'}: {status}",
            style="green" if status == "SERVING" else "red",
        )
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(ExitCode.UNAVAILABLE)


@db_app.command("migrate")
def db_migrate(
    ctx: typer.Context,
    dsn: Annotated[
        str | None,
        typer.Option(
            "--dsn", envvar="HASHMESH_DATABASE_URL", help="PostgreSQL DSN (HASHMESH_DATABASE_URL)."
        ),
    ] = None,
    json_out: JsonFlag = False,
) -> None:
    """Apply pending schema migrations (safe while daemons start: advisory lock).

    Example:

      hashctl db migrate --dsn postgresql://postgres@127.0.0.1:5432/hashmesh
    """
    from hashmesh.core.errors import Unavailable
    from hashmesh.core.queue import migrations
    from hashmesh.core.queue.db import DatabaseError

    out = state_of(ctx).output(json_out)
    dsn = dsn or os.environ.get("HASHMESH_DATABASE_URL")
    if not dsn:
        raise CliError("no database: give --dsn or set HASHMESH_DATABASE_URL", ExitCode.USAGE)
    try:
        applied = migrations.migrate(dsn)
        version = migrations.current_version(dsn)
    except Unavailable as exc:
        raise CliError(f"cannot reach the database: {exc}", ExitCode.UNAVAILABLE) from None
    except DatabaseError as exc:
        raise CliError(f"migration failed: {exc}") from None
    if out.json_mode:
        out.json(
            {
                "applied": [{"version": m.version, "name": m.name} for m in applied],
                "version": version,
            }
        )
        return
    for migration in applied:
        out.line(f"applied {migration.version:04d}_{migration.name}")
    out.line(f"schema at version {version}" + ("" if applied else " (nothing to do)"))
