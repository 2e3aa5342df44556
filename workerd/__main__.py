"""``workerd``: run tasks from the PostgreSQL queue until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
from dataclasses import replace
from pathlib import Path

import uvloop

from hashmesh.core import logs, metrics
from hashmesh.core.queue.db import DatabaseError
from hashmesh.core.queue.sealing import TaskKeyring
from hashmesh.core.settings import SettingsError
from hashmesh.core.signals import wait_for_signal
from hashmesh.workerd.config import WorkerSettings
from hashmesh.workerd.worker import Worker


async def serve(settings: WorkerSettings, endpoint: metrics.MetricsServer | None = None) -> None:
    stop = asyncio.Event()
    worker = Worker.on_postgres(settings)

    def on_ready() -> None:
        # The ready line stays first: readers (tests/procs.py, hashctl up) take it as the marker.
        print(f"workerd ready as {worker.name}", flush=True)
        if endpoint is not None:
            print(f"workerd metrics listening on {endpoint.address}", flush=True)

    async def on_signal() -> None:
        await wait_for_signal()
        stop.set()

    watcher = asyncio.create_task(on_signal())
    try:
        await worker.run(stop, on_ready=on_ready)
    finally:
        watcher.cancel()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="workerd", description="hashmesh task worker")
    parser.add_argument(
        "--database-url",
        help="PostgreSQL DSN (HASHMESH_DATABASE_URL; prefer the variable when the DSN holds a "
        "password: every local user can read a command line)",
    )
    parser.add_argument(
        "--task-key-file",
        help="keys sealing task inputs at rest, first one active (HASHMESH_TASK_KEY_FILE)",
    )
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
    parser.add_argument(
        "--metrics-port",
        type=int,
        help="Prometheus /metrics port; 0 picks a free one (HASHMESH_WORKERD_METRICS_PORT)",
    )
    parser.add_argument(
        "--metrics-host",
        help="address of the metrics endpoint, 127.0.0.1 by default; 0.0.0.0 in containers "
        "(HASHMESH_WORKERD_METRICS_HOST)",
    )
    args = parser.parse_args(argv)
    logs.configure("workerd")
    try:
        settings = WorkerSettings.from_env()
        if args.database_url:
            settings = replace(settings, database=replace(settings.database, dsn=args.database_url))
        settings = settings.with_overrides(
            name=args.name,
            concurrency=args.concurrency,
            cpu_workers=args.cpu_workers,
            grace_seconds=args.grace,
            metrics_port=args.metrics_port,
            metrics_host=args.metrics_host,
            task_keys=TaskKeyring.load_file(Path(args.task_key_file))
            if args.task_key_file
            else None,
        )
    except SettingsError as exc:
        parser.error(str(exc))
    endpoint = None
    if settings.metrics_port is not None:
        # Bound before the database is reached: a taken port fails at once, and the liveness
        # probes (which read this endpoint) see a live process while it waits for PostgreSQL.
        try:
            endpoint = metrics.start_metrics_server(
                settings.metrics_port, host=settings.metrics_host
            )
        except OSError as exc:
            parser.exit(
                2,
                f"workerd: error: cannot serve metrics on "
                f"{settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}\n",
            )
    try:
        # uvloop: each wake-up, statement and write-back is a few event-loop turns, and
        # uvloop's are cheaper (bench/tasks_e2e.py latency).
        uvloop.run(serve(settings, endpoint))
    except DatabaseError as exc:  # e.g. a DSN that does not parse (unreachable ones are retried)
        parser.exit(3, f"workerd: error: cannot use the database: {exc}\n")
    finally:
        if endpoint is not None:
            endpoint.close()


if __name__ == "__main__":
    main()
