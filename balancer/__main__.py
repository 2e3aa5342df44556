"""``hashmesh-balancer``: the gRPC front of the mesh."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable

# Nothing here imports grpc: it reads its transport choice once, when first imported, so
# ``grpc_transport.configure`` runs before the modules that import it (inside ``main``).
from hashmesh.core import grpc_transport, logs
from hashmesh.core.settings import SettingsError


def _csv(raw: str | None) -> tuple[str, ...] | None:
    return None if raw is None else tuple(item.strip() for item in raw.split(",") if item.strip())


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when asked for, or when ``auto`` and it is installed: it makes each forwarded
    call markedly cheaper (see bench/balancer_bench.py)."""
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            sys.exit(
                "hashmesh-balancer: HASHMESH_BALANCER_EVENT_LOOP=uvloop but uvloop is not installed"
            )
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> None:
    try:
        grpc_transport.configure(os.environ)
    except SettingsError as exc:
        sys.exit(f"hashmesh-balancer: {exc}")
    from hashmesh.balancer.affinity import allowed_cpus, chosen, parse_cpus, pin
    from hashmesh.balancer.config import (
        RATELIMIT_HEADERS,
        STRATEGIES,
        BalancerSettings,
        parse_limit,
    )

    parser = argparse.ArgumentParser(prog="hashmesh-balancer", description="hashmesh gRPC balancer")
    parser.add_argument("--listen", help="host:port for clients (HASHMESH_BALANCER_LISTEN)")
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        default=None,
        help="share --listen's port with other balancer processes (SO_REUSEPORT; "
        "HASHMESH_BALANCER_REUSE_PORT)",
    )
    parser.add_argument(
        "--admin-listen", help="host:port for AdminService (HASHMESH_BALANCER_ADMIN_LISTEN)"
    )
    parser.add_argument("--backends", help="replicas, comma-separated (HASHMESH_BALANCER_BACKENDS)")
    parser.add_argument(
        "--backends-dns", help="name:port re-resolved periodically (HASHMESH_BALANCER_BACKENDS_DNS)"
    )
    parser.add_argument(
        "--strategy", choices=STRATEGIES, help="picking policy (HASHMESH_BALANCER_STRATEGY)"
    )
    parser.add_argument(
        "--rate-limit", help="default per-peer limit rate[/burst] (HASHMESH_BALANCER_RATE_LIMIT)"
    )
    parser.add_argument(
        "--ratelimit-headers",
        choices=RATELIMIT_HEADERS,
        help="RateLimit fields in the headers of every unary answer (always) or only near "
        "exhaustion (near, the default); trailers always carry them "
        "(HASHMESH_BALANCER_RATELIMIT_HEADERS)",
    )
    parser.add_argument(
        "--state-file",
        help="keeps strategy, limits and drains set at run time (HASHMESH_BALANCER_STATE_FILE)",
    )
    parser.add_argument(
        "--redis-url",
        help="share rate limits among balancers through this Redis (HASHMESH_BALANCER_REDIS_URL)",
    )
    parser.add_argument(
        "--api-keys-file", help="client API keys, hashed (HASHMESH_BALANCER_API_KEYS_FILE)"
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port on the --listen host; "
        "0 picks a free one (HASHMESH_BALANCER_METRICS_PORT)",
    )
    parser.add_argument(
        "--tls-cert", help="PEM server certificate of both listeners (HASHMESH_TLS_CERT_FILE)"
    )
    parser.add_argument("--tls-key", help="PEM key of --tls-cert (HASHMESH_TLS_KEY_FILE)")
    parser.add_argument(
        "--tls-client-ca",
        help="PEM CA of client certificates: turns on mutual TLS (HASHMESH_TLS_CLIENT_CA_FILE)",
    )
    parser.add_argument(
        "--upstream-tls-ca",
        help="dial replicas with TLS; PEM CA of their certificates "
        "(HASHMESH_BALANCER_UPSTREAM_TLS_CA_FILE)",
    )
    parser.add_argument(
        "--upstream-tls-cert",
        help="PEM client certificate for mutual TLS with replicas "
        "(HASHMESH_BALANCER_UPSTREAM_TLS_CLIENT_CERT_FILE)",
    )
    parser.add_argument(
        "--upstream-tls-key",
        help="PEM key of --upstream-tls-cert (HASHMESH_BALANCER_UPSTREAM_TLS_CLIENT_KEY_FILE)",
    )
    parser.add_argument(
        "--upstream-tls-server-name",
        help="name to check in replica certificates "
        "instead of the dialled address (HASHMESH_BALANCER_UPSTREAM_TLS_SERVER_NAME)",
    )
    parser.add_argument(
        "--cpus",
        help="pin the process: auto (one CPU, the default), off, or CPU numbers such as 1, "
        "0,2 or 2-3 (HASHMESH_BALANCER_CPUS)",
    )
    parser.add_argument(
        "--cpu-index",
        type=int,
        help="with --cpus auto: take the CPU this many from the last, so that processes on "
        "one host each take their own (HASHMESH_BALANCER_CPU_INDEX)",
    )
    args = parser.parse_args(argv)
    logs.configure("balancer")
    try:
        settings = (
            BalancerSettings.from_env()
            .with_overrides(
                listen=args.listen,
                reuse_port=args.reuse_port,
                admin_listen=args.admin_listen,
                backends=_csv(args.backends),
                backends_dns=_csv(args.backends_dns),
                strategy=args.strategy,
                rate_limit=parse_limit(args.rate_limit) if args.rate_limit else None,
                ratelimit_headers=args.ratelimit_headers,
                redis_url=args.redis_url,
                api_keys_file=args.api_keys_file,
                state_file=args.state_file,
                metrics_port=args.metrics_port,
                cpus=parse_cpus(args.cpus) if args.cpus is not None else None,
                cpu_index=args.cpu_index,
            )
            .with_tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)
            .with_upstream_tls(
                args.upstream_tls_ca,
                args.upstream_tls_cert,
                args.upstream_tls_key,
                args.upstream_tls_server_name,
            )
        )
    except SettingsError as exc:
        sys.exit(f"hashmesh-balancer: {exc}")
    if not settings.identity_secret:
        sys.exit(
            "hashmesh-balancer: HASHMESH_IDENTITY_SECRET is not set: the replicas need it to tell "
            "the balancer's identity stamp from a forged one (any random string of 16+ characters, "
            "the same for every balancer and hashd of the mesh)"
        )
    if not settings.backends and not settings.backends_dns:
        sys.exit("hashmesh-balancer: no replicas: pass --backends or --backends-dns")
    if settings.cpus:
        try:
            cpus = chosen(settings.cpus, allowed_cpus(), settings.cpu_index)
        except SettingsError as exc:
            sys.exit(f"hashmesh-balancer: {exc}")
        if cpus:
            pin(cpus)
    from hashmesh.balancer.server import run

    with asyncio.Runner(loop_factory=_loop_factory(settings.event_loop)) as runner:
        try:
            runner.run(run(settings))
        except SettingsError as exc:  # e.g. a certificate file that cannot be read
            sys.exit(f"hashmesh-balancer: {exc}")
        except OSError as exc:  # a listener that cannot bind: one line, no traceback
            sys.exit(f"hashmesh-balancer: {exc}")


if __name__ == "__main__":
    main()
