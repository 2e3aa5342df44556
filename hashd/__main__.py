"""``hashd``: serve HashService, TaskService and CacheService."""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

# Nothing here imports grpc: it reads its transport choice once, when first imported, so
# ``grpc_transport.configure`` runs before the modules that import it (inside ``main``).
from hashmesh.core import grpc_transport, logs
from hashmesh.core.settings import SettingsError


def main(argv: list[str] | None = None) -> None:
    try:
        grpc_transport.configure(os.environ)
    except SettingsError as exc:
        sys.exit(f"hashd: {exc}")
    import uvloop

    from hashmesh.core.errors import Unavailable
    from hashmesh.core.queue.db import DatabaseError
    from hashmesh.core.queue.sealing import TaskKeyring
    from hashmesh.hashd.config import HashdSettings

    parser = argparse.ArgumentParser(
        prog="hashd", description="hashmesh replica (HashService, TaskService)"
    )
    parser.add_argument("--listen", help="host:port to serve on (HASHMESH_HASHD_LISTEN)")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL DSN (HASHMESH_DATABASE_URL; prefer the variable when the DSN holds a "
        "password: every local user can read a command line)",
    )
    parser.add_argument(
        "--task-key-file",
        help="keys sealing task inputs at rest, first one active (HASHMESH_TASK_KEY_FILE)",
    )
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port on the --listen host; 0 picks a free one "
        "(HASHMESH_HASHD_METRICS_PORT)",
    )
    parser.add_argument("--tls-cert", help="PEM server certificate (HASHMESH_TLS_CERT_FILE)")
    parser.add_argument("--tls-key", help="PEM key of --tls-cert (HASHMESH_TLS_KEY_FILE)")
    parser.add_argument(
        "--tls-client-ca",
        help="PEM CA of client certificates: turns on mutual TLS (HASHMESH_TLS_CLIENT_CA_FILE)",
    )
    args = parser.parse_args(argv)
    logs.configure("hashd")
    try:
        settings = (
            HashdSettings.from_env()
            .with_overrides(
                listen=args.listen,
                metrics_port=args.metrics_port,
                task_keys=TaskKeyring.load_file(Path(args.task_key_file))
                if args.task_key_file
                else None,
            )
            .with_tls_files(args.tls_cert, args.tls_key, args.tls_client_ca)
        )
        if args.database_url:
            settings = replace(settings, database=replace(settings.database, dsn=args.database_url))
    except SettingsError as exc:
        parser.error(str(exc))
    if not settings.identity_secret:
        parser.error(
            "HASHMESH_IDENTITY_SECRET is not set: it tells the balancer's identity stamp from a "
            "forged one (any random string of 16+ characters, the same in every balancer and hashd)"
        )
    from hashmesh.hashd.server import run

    try:
        # uvloop: every call and statement takes several event-loop turns, and its are cheaper.
        uvloop.run(run(settings))
    except SettingsError as exc:  # e.g. a certificate file that cannot be read
        parser.exit(2, f"hashd: error: {exc}\n")
    except OSError as exc:  # a listener that cannot bind
        parser.exit(1, f"hashd: error: {exc}\n")
    except (Unavailable, DatabaseError) as exc:  # a wrong DSN or a database down: one line
        parser.exit(3, f"hashd: error: cannot use the database: {exc}\n")


if __name__ == "__main__":
    main()
