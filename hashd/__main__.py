"""``hashd``: serve HashService, TaskService and CacheService."""

from __future__ import annotations

import argparse
import asyncio

from hashmesh.core import logs
from hashmesh.hashd.config import HashdSettings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="hashd", description="hashmesh replica (HashService, TaskService)"
    )
    parser.add_argument("--listen", help="host:port to serve on (HASHMESH_HASHD_LISTEN)")
    parser.add_argument("--database-url", help="PostgreSQL DSN (HASHMESH_DATABASE_URL)")
    parser.add_argument(
        "--metrics-port", type=int, help="Prometheus port (HASHMESH_HASHD_METRICS_PORT)"
    )
    args = parser.parse_args(argv)
    logs.configure("hashd")
    settings = HashdSettings.from_env().with_overrides(
        listen=args.listen, metrics_port=args.metrics_port
    )
    if args.database_url:
        from dataclasses import replace

        settings = settings.with_overrides(
            database=replace(settings.database, dsn=args.database_url)
        )
    from hashmesh.hashd.server import run

    asyncio.run(run(settings))


if __name__ == "__main__":
    main()
