"""``workerd``: run tasks from the PostgreSQL queue until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace

from hashmesh.core import logs
from hashmesh.core.rpc import wait_for_signal
from hashmesh.workerd.config import WorkerSettings
from hashmesh.workerd.worker import Worker


async def serve(settings: WorkerSettings) -> None:
    stop = asyncio.Event()
    worker = Worker(settings)

    async def on_signal() -> None:
        await wait_for_signal()
        stop.set()

    watcher = asyncio.create_task(on_signal())
    try:
        await worker.run(
            stop, on_ready=lambda: print(f"workerd ready as {worker.name}", flush=True)
        )
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="workerd", description="hashmesh task worker")
    parser.add_argument("--database-url", help="PostgreSQL DSN (HASHMESH_DATABASE_URL)")
    parser.add_argument("--name", help="unique worker name (HASHMESH_WORKERD_NAME)")
    parser.add_argument(
        "--concurrency", type=int, help="most tasks held at once (HASHMESH_WORKERD_CONCURRENCY)"
    )
    parser.add_argument(
        "--cpu-workers", type=int, help="threads for argon2 tasks (HASHMESH_WORKERD_CPU_WORKERS)"
    )
    parser.add_argument(
        "--grace",
        type=float,
        help="seconds to finish in-flight tasks on SIGTERM (HASHMESH_GRACE_SECONDS)",
    )
    args = parser.parse_args(argv)
    logs.configure("workerd")
    settings = WorkerSettings.from_env()
    if args.database_url:
        settings = replace(settings, database=replace(settings.database, dsn=args.database_url))
    settings = settings.with_overrides(
        name=args.name,
        concurrency=args.concurrency,
        cpu_workers=args.cpu_workers,
        grace_seconds=args.grace,
    )
    asyncio.run(serve(settings))


if __name__ == "__main__":
    main()
